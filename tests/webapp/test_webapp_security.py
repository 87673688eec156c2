"""The web app under hostile use, on SQLite and on a real PostgreSQL 15: session fixation, CSRF on every form and
every session write (routes enumerated from the app), a sign-in lockout that ends and never locks the user out
of their own browser, uploads whose declared type lies, another user's study ids (routes enumerated from the
app), and the audit log (what it records, the reading room's sign-off, corrections and PDFs included; append-only
in the ORM and in the database, admins only, the CLI).

The app runs in-process (TestClient, lifespan and retry worker included) in front of a transformer address
that refuses connections, so every upload is stored and stays ``pending``: none of these checks needs a score,
and a study that needs one is given it in the database.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from tests.webapp.test_webapp_api import PASSWORD, Backend, csrf_of, login
from webapp_fixtures import free_port, full_res_xrays, make_dicom, pneumoscope

pytestmark = pytest.mark.integration

USERS = (("alice", False), ("bob", False), ("chief", True))
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app_backend(request, tmp_path_factory):
    from webapp import accounts
    from webapp.app import create_app
    from webapp.db import transaction
    from webapp.settings import WebSettings

    root = tmp_path_factory.mktemp(f"web-security-{request.param}")
    if request.param == "sqlite":
        database = f"sqlite:///{root / 'web.db'}"
    else:
        database = request.getfixturevalue("postgres").create_database("security_tests")
    settings = WebSettings(home=root, database_url=database, image_store=str(root / "images"),
                           inference_url=f"http://127.0.0.1:{free_port()}", secret_key="security-secret",
                           login_max_failures_per_user=3, login_max_failures_per_client=6, login_window_s=900,
                           retry_initial_s=60, worker_poll_s=0.5, inline_wait_s=2)
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.ctx.factory) as db:
            for name, admin in USERS:
                accounts.add_user(db, name, PASSWORD, admin=admin)
            tokens = {name: accounts.issue_token(db, name, "tests")[0] for name, _ in USERS}
        yield Backend(request.param, app, client, settings, tokens,
                      {"PNEUMOSCOPE_DATABASE_URL": database, "PNEUMOSCOPE_IMAGE_STORE": str(root / "images"),
                       "PNEUMOSCOPE_HOME": str(root)})


@pytest.fixture(scope="module")
def xray() -> Path:
    return full_res_xrays(1)[0]


def upload(backend: Backend, user: str, path: Path, content_type: str = "image/jpeg") -> dict:
    response = backend.api(user).post("/api/studies", files={"file": (path.name, path.read_bytes(), content_type)})
    assert response.status_code == 202, response.text  # the transformer refuses connections: stored, pending
    return response.json()


@pytest.fixture(scope="module")
def alices_study(app_backend, xray) -> dict:
    """One of alice's studies, given a result in the database (the checks below need one to review)."""
    from webapp.models import Study, utcnow

    study = upload(app_backend, "alice", xray)
    with app_backend.ctx.factory() as db:
        db.execute(update(Study).where(Study.id == study["id"]).values(
            status="done", probability=0.8, label="PNEUMONIA", threshold=0.5, model_name="pneumonia",
            model_version="1", scored_at=utcnow(), next_attempt_at=None, lease_until=None))
        db.commit()
    return study


def audit_lines(backend: Backend, **where) -> list:
    from webapp.models import AuditEvent

    with backend.ctx.factory() as db:
        query = select(AuditEvent).order_by(AuditEvent.id)
        for column, value in where.items():
            query = query.where(getattr(AuditEvent, column) == value)
        return list(db.scalars(query))


def sign_in_form(client: TestClient, user: str, password: str):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": user, "password": password, "csrf_token": token})


# -- sessions ------------------------------------------------------------------------------------------------

def test_the_session_id_changes_at_sign_in_and_a_planted_one_dies(app_backend):
    from webapp.dependencies import SESSION_COOKIE

    attacker = login(app_backend, "bob")  # a real session, which the attacker plants in the victim's browser
    planted = attacker.cookies.get(SESSION_COOKIE)
    victim = app_backend.new_client(follow_redirects=False)
    victim.cookies.set(SESSION_COOKIE, planted, domain="testserver.local", path="/")
    assert victim.get("/").status_code == 200  # the planted session works until the victim signs in
    assert sign_in_form(victim, "alice", PASSWORD).status_code == 303
    fresh = victim.cookies.get(SESSION_COOKIE)
    assert fresh and fresh != planted
    assert attacker.get("/").status_code == 303, "the planted session must be closed by the sign-in"
    assert "Signed in as <strong>alice</strong>" in victim.get("/").text
    again = app_backend.new_client(follow_redirects=False)
    again.cookies.set(SESSION_COOKIE, fresh, domain="testserver.local", path="/")
    assert sign_in_form(again, "alice", PASSWORD).status_code == 303
    assert again.cookies.get(SESSION_COOKIE) != fresh  # every sign-in gets a new id, even over a valid one
    assert victim.get("/").status_code == 303


# -- CSRF on every form and every session write (routes enumerated from the app) -------------------------------

def app_routes(app) -> list[tuple[str, set[str]]]:
    """(full path, methods) of every route of the app, included routers resolved (FastAPI keeps them nested)."""
    from fastapi.routing import iter_route_contexts

    routes = [(context.path, set(context.methods)) for context in iter_route_contexts(app.routes)
              if isinstance(context.original_route, APIRoute)]
    assert len(routes) >= 15, routes
    return routes


def unsafe_routes(app) -> list[tuple[str, str]]:
    return sorted((method, path) for path, methods in app_routes(app) for method in methods & UNSAFE)


def test_every_unsafe_route_refuses_a_session_request_without_its_csrf_token(app_backend, alices_study):
    routes = unsafe_routes(app_backend.app)
    assert ("POST", "/api/studies") in routes and ("POST", "/studies/{study_id}/feedback") in routes
    client = login(app_backend, "alice")
    token = csrf_of(client)
    study = str(alices_study["id"])
    for method, path in routes:
        url = path.replace("{study_id}", study)
        if path == "/login":  # the sign-in form's own token is bound to a cookie of the form (login CSRF)
            fresh = app_backend.new_client(follow_redirects=False)
            fresh.get("/login")
            refused = fresh.post("/login", data={"username": "alice", "password": PASSWORD})
            assert refused.status_code == 403, refused.text
            continue
        for presented in (None, "forged-" + token[7:]):
            if path.startswith("/api/"):
                headers = {"x-csrf-token": presented} if presented else {}
                response = client.request(method, url, headers=headers, json={"verdict": "confirmed"})
            else:  # multipart, as the upload form sends it (the token travels in the body)
                data = {"csrf_token": presented} if presented else {}
                response = client.request(method, url, data={**data, "verdict": "confirmed"},
                                          files={"file": ("x.jpeg", b"\xff\xd8\xff", "image/jpeg")})
            assert response.status_code == 403, (method, path, presented, response.status_code, response.text[:300])
    assert client.get("/").status_code == 200  # nothing above signed alice out


def test_every_post_form_on_every_page_carries_the_csrf_token(app_backend, alices_study):
    client = login(app_backend, "chief")
    study = alices_study["id"]
    pages = [path.replace("{study_id}", str(study)) for path, methods in app_routes(app_backend.app)
             if "GET" in methods and not path.startswith("/api/") and path not in ("/healthz", "/readyz", "/metrics",
                                                                                      "/login")]
    assert {"/", "/studies", f"/studies/{study}", "/admin/audit"} <= set(pages)
    forms = 0
    for page in pages:
        html = client.get(page).text
        for form in re.findall(r"<form\b[^>]*>.*?</form>", html, re.S | re.I):
            if re.search(r'method="post"', form, re.I):
                forms += 1
                assert re.search(r'name="csrf_token" value="[^"]+"', form), (page, form[:200])
    assert forms >= 4  # upload, review, sign-out on each page
    sign_in = app_backend.new_client().get("/login").text
    assert re.search(r'<form[^>]*method="post".*?name="csrf_token" value="[^"]+"', sign_in, re.S | re.I)


# -- the sign-in lockout ----------------------------------------------------------------------------------------

def test_a_lockout_ends_and_never_locks_the_user_out_of_their_own_browser(app_backend):
    from webapp.models import LoginAttempt, utcnow

    own_browser = app_backend.new_client(follow_redirects=False)
    assert sign_in_form(own_browser, "bob", PASSWORD).status_code == 303  # bob's browser is now known
    attacker = app_backend.new_client(follow_redirects=False, client=("203.0.113.9", 50000))
    for _ in range(app_backend.settings.login_max_failures_per_user):
        assert sign_in_form(attacker, "bob", "guess-guess-guess").status_code == 401
    locked = sign_in_form(attacker, "bob", PASSWORD)
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text  # even with the password
    new_device = app_backend.new_client(follow_redirects=False)
    assert sign_in_form(new_device, "bob", PASSWORD).status_code == 429  # a new browser waits too
    assert sign_in_form(own_browser, "bob", PASSWORD).status_code == 303, "bob's own browser must get in"
    assert sign_in_form(attacker, "bob", PASSWORD).status_code == 429  # and that did not reset the count
    for _ in range(app_backend.settings.login_max_failures_per_user):  # the own browser has its own limit
        sign_in_form(own_browser, "bob", "typo-typo-typo")
    assert sign_in_form(own_browser, "bob", PASSWORD).status_code == 429
    with app_backend.ctx.factory() as db:  # the window passes: nobody stays locked out
        window = timedelta(seconds=app_backend.settings.login_window_s)
        db.execute(update(LoginAttempt).values(at=utcnow() - window * 1.01))
        db.commit()
    assert sign_in_form(new_device, "bob", PASSWORD).status_code == 303
    assert sign_in_form(own_browser, "bob", PASSWORD).status_code == 303
    refused = audit_lines(app_backend, action="sign_in_refused")
    assert refused and {line.client for line in refused} >= {"203.0.113.9"}
    assert sign_in_form(attacker, "Mrs Patient Name", "guess-guess-guess").status_code == 401
    typed = audit_lines(app_backend, action="sign_in_failed")[-1]  # an unknown name is not written down
    assert typed.actor == "(unknown)" and typed.actor_id is None and typed.detail == "unknown user name"
    assert not any("Patient" in line.actor + line.detail for line in audit_lines(app_backend))
    with app_backend.ctx.factory() as db:  # nor, for the rate limits, in the failures table: hashed there
        assert not any("patient" in name for name in db.scalars(select(LoginAttempt.username)))


# -- uploads that lie ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("declared, content", [("image/png", "jpeg"), ("application/dicom", "jpeg"),
                                               ("image/jpeg", "dicom"), ("text/plain", "jpeg"),
                                               ("image/gif", "jpeg")])
def test_an_upload_whose_declared_type_lies_is_refused_and_nothing_is_kept(app_backend, xray, declared, content):
    data = xray.read_bytes() if content == "jpeg" else make_dicom(xray)
    before = len(audit_lines(app_backend, action="uploaded"))
    response = app_backend.api("alice").post("/api/studies", files={"file": ("film", data, declared)})
    assert response.status_code == 415, response.text
    body = response.json()
    assert body["code"] == "type_mismatch" and declared in body["error"] and content.upper() in body["error"]
    assert len(audit_lines(app_backend, action="uploaded")) == before
    for honest in ("application/octet-stream", {"jpeg": "image/jpeg", "dicom": "application/dicom"}[content]):
        kept = app_backend.api("alice").post("/api/studies", files={"file": ("film", data, honest)})
        assert kept.status_code == 202, (honest, kept.text)


# -- another user's study (routes enumerated from the app) -----------------------------------------------------

#: Bodies for the routes that take one; a new write route on a study must add its sample here (the test says so).
SAMPLE_BODIES = {("POST", "/api/studies/{study_id}/feedback"): {"json": {"verdict": "confirmed"}},
                 ("POST", "/studies/{study_id}/feedback"): {"data": {"verdict": "confirmed"}},
                 ("PUT", "/api/studies/{study_id}/patient"): {"json": {"patient_ref": "MRN-1"}},
                 ("PUT", "/api/studies/{study_id}/report/draft"): {"json": {"impression": "Clear lungs."}},
                 ("POST", "/api/studies/{study_id}/report/sign"): {},
                 ("POST", "/api/studies/{study_id}/report/corrections"): {"json": {"reason": "wrong side"}},
                 ("POST", "/studies/{study_id}/report"): {"data": {"action": "save", "impression": "Clear lungs."}}}


def study_routes(app) -> list[tuple[str, str]]:
    return sorted((method, path) for path, methods in app_routes(app) if "{study_id}" in path
                  for method in methods - {"HEAD", "OPTIONS"})


def test_a_value_the_database_cannot_store_is_refused_with_a_reason_not_a_500(app_backend):
    """schemathesis found it on PostgreSQL: a NUL character in a search parameter (PostgreSQL text cannot hold it)
    made the list and the audit log answer 500. It is the client's value: 422 with the reason (SQLite stores it)."""
    for user, path in (("alice", "/api/studies?q=a%00b"), ("chief", "/api/audit?actor=a%00b")):
        response = app_backend.api(user).get(path)
        assert response.status_code in (200, 422), (path, response.status_code, response.text[:200])
        assert response.status_code == 200 or "cannot store" in response.json()["error"], response.text[:200]


def test_every_route_that_takes_a_study_id_answers_404_for_another_users_study(app_backend, alices_study):
    routes = study_routes(app_backend.app)
    assert len(routes) >= 8, routes  # 5 API reads, API feedback, the study and report pages, the review form
    study = alices_study["id"]
    bob_api = app_backend.api("bob")
    bob_page = login(app_backend, "bob")
    token = csrf_of(bob_page)
    missing = set()
    for method, path in routes:
        if method in UNSAFE and (method, path) not in SAMPLE_BODIES:
            missing.add((method, path))
            continue
        body = dict(SAMPLE_BODIES.get((method, path), {}))
        for target in (study, 987654321):  # alice's study and one that does not exist: the same answer
            url = path.replace("{study_id}", str(target))
            if path.startswith("/api/"):
                response = bob_api.request(method, url, **body)
                assert response.status_code == 404, (method, path, response.text[:300])
                assert response.json() == {"error": f"study {target} not found", "code": "not_found"}
            else:
                if "data" in body:
                    body["data"] = {**body["data"], "csrf_token": token}
                response = bob_page.request(method, url, **body)
                assert response.status_code == 404, (method, path, response.text[:300])
    assert not missing, f"add a sample body to SAMPLE_BODIES for {sorted(missing)}"
    assert not audit_lines(app_backend, actor="bob", study_id=study), "a refused read is no read"
    alice = app_backend.api("alice")
    assert alice.get(f"/api/studies/{study}").status_code == 200  # the owner still reads it
    assert app_backend.api("chief").get(f"/api/studies/{study}").status_code == 200  # and an admin


# -- the audit log ------------------------------------------------------------------------------------------

def test_the_audit_log_records_who_did_what_to_which_study_and_when(app_backend, xray):
    from webapp.models import Study, utcnow

    started = utcnow()
    client = login(app_backend, "alice")
    token = csrf_of(client)
    created = client.post("/api/studies", files={"file": ("Doe_Jane.jpeg", xray.read_bytes(), "image/jpeg")},
                          headers={"x-csrf-token": token})
    assert created.status_code == 202, created.text
    study = created.json()["id"]
    with app_backend.ctx.factory() as db:
        db.execute(update(Study).where(Study.id == study).values(status="done", probability=0.2, label="NORMAL",
                                                                 threshold=0.5, scored_at=utcnow()))
        db.commit()
    assert client.get(f"/studies/{study}").status_code == 200
    for _ in range(3):  # a page polling the study writes one line, not three
        assert client.get(f"/api/studies/{study}").status_code == 200
    assert client.get(f"/api/studies/{study}/image").status_code == 200
    assert client.get(f"/api/studies/{study}/report").status_code == 200
    corrected = client.post(f"/studies/{study}/feedback", data={"verdict": "corrected", "label": "PNEUMONIA",
                                                                "csrf_token": token})
    assert corrected.status_code == 303
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    lines = [line for line in audit_lines(app_backend, actor="alice") if line.at >= started]
    actions = [(line.action, line.study_id, line.detail) for line in lines]
    assert actions == [("signed_in", None, "new device"), ("uploaded", study, "jpeg"), ("viewed", study, "page"),
                       ("viewed", study, "result"), ("viewed", study, "image"), ("exported", study, "report PDF"),
                       ("corrected", study, "label PNEUMONIA"), ("signed_out", None, "")], actions
    assert all(line.actor_id is not None and line.client == "testclient" for line in lines)
    assert all(started <= line.at <= utcnow() for line in lines)
    assert not any("Doe" in f"{line.detail}{line.actor}" for line in audit_lines(app_backend)), "no file names"


def test_the_audit_log_records_the_reading_rooms_reads_sign_off_corrections_and_pdfs(app_backend, xray):
    from webapp.models import Study, utcnow
    from webapp_fixtures import cam_grid

    study = upload(app_backend, "alice", xray)["id"]
    with app_backend.ctx.factory() as db:
        db.execute(update(Study).where(Study.id == study).values(
            status="done", probability=0.9, label="PNEUMONIA", threshold=0.5, scored_at=utcnow(),
            cam=cam_grid(7, 7, {(3, 2): 1.0}), next_attempt_at=None, lease_until=None))
        db.commit()
    api = app_backend.api("alice")
    for path in ("cam", "overlay", "report/versions"):
        assert api.get(f"/api/studies/{study}/{path}").status_code == 200, path
    assert api.put(f"/api/studies/{study}/report/draft", json={"impression": "Right lower lobe."}).status_code == 200
    assert api.post(f"/api/studies/{study}/report/sign").status_code == 200
    assert api.get(f"/api/studies/{study}/report").status_code == 200
    reason = "the wrong side was named"
    assert api.post(f"/api/studies/{study}/report/corrections", json={"reason": reason}).status_code == 201
    page = login(app_backend, "alice")
    signed = page.post(f"/studies/{study}/report", data={"action": "sign", "impression": "Left lower lobe.",
                                                          "csrf_token": csrf_of(page)})
    assert signed.status_code == 303, signed.text[:300]
    assert api.get(f"/api/studies/{study}/report?version=1").status_code == 200
    lines = audit_lines(app_backend, actor="alice", study_id=study)
    assert [(line.action, line.detail) for line in lines] == [
        ("uploaded", "jpeg"), ("viewed", "cam"), ("viewed", "overlay"), ("viewed", "report versions"),
        ("signed", "report v1"), ("exported", "report PDF v1"), ("corrected", "report v2 corrects v1"),
        ("signed", "report v2"), ("exported", "report PDF v1")], lines
    assert {line.client for line in lines} == {"testclient"}
    assert not any(reason in line.detail for line in audit_lines(app_backend)), "the reason is the doctor's text"
    refused = api.post(f"/api/studies/{study}/report/sign")  # signed already: 409, and no line
    assert refused.status_code == 409 and len(audit_lines(app_backend, actor="alice", study_id=study)) == len(lines)

def test_the_audit_log_is_append_only_in_the_orm_and_in_the_database(app_backend):
    from sqlalchemy import delete

    from webapp import audit
    from webapp.models import AuditEvent

    assert audit_lines(app_backend)
    with app_backend.ctx.factory() as db:
        line = db.scalars(select(AuditEvent).limit(1)).one()
        line.detail = "rewritten"
        with pytest.raises(audit.AuditLogIsAppendOnly):
            db.flush()
        db.rollback()
        db.delete(db.scalars(select(AuditEvent).limit(1)).one())
        with pytest.raises(audit.AuditLogIsAppendOnly):
            db.flush()
        db.rollback()
        for statement in (update(AuditEvent).values(detail="x"), delete(AuditEvent)):
            with pytest.raises(audit.AuditLogIsAppendOnly):
                db.execute(statement)
            db.rollback()
    count = len(audit_lines(app_backend))
    raw = ["UPDATE audit_events SET detail = 'x'", "DELETE FROM audit_events"]
    if app_backend.name == "postgresql":
        raw.append("TRUNCATE audit_events")
    for sql in raw:  # straight to the database, past the ORM: the triggers refuse
        with app_backend.ctx.engine.connect() as connection:
            with pytest.raises(Exception, match="append-only"):
                connection.execute(text(sql))
            connection.rollback()
    assert len(audit_lines(app_backend)) == count
    assert not re.search(r"(update|delete)\(AuditEvent", Path(audit.__file__).read_text())


def test_the_audit_log_is_for_admins_on_a_page_from_the_api_and_from_the_cli(app_backend, alices_study):
    study = alices_study["id"]
    alice_api = app_backend.api("alice")
    assert alice_api.get(f"/api/studies/{study}").status_code == 200
    refused = alice_api.get("/api/audit")
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert login(app_backend, "alice").get("/admin/audit").status_code == 403
    chief = app_backend.api("chief")
    answer = chief.get("/api/audit", params={"study": study, "action": "viewed"}).json()
    assert answer["total"] >= 1 and all(i["study_id"] == study and i["action"] == "viewed" for i in answer["items"])
    assert chief.get("/api/audit", params={"action": "rewrote"}).status_code == 422
    page = login(app_backend, "chief").get("/admin/audit", params={"actor": "alice"})
    assert page.status_code == 200 and "Audit log" in page.text and f"#{study}" in page.text
    assert audit_lines(app_backend, actor="chief", action="audit_read")

    done = pneumoscope("audit", "--study", str(study), "--json", env=app_backend.env)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows and all(row["study_id"] == study for row in rows)
    assert any(row["actor"] == "alice" and row["action"] == "viewed" for row in rows)
    wrong = pneumoscope("audit", "--action", "rewrote", env=app_backend.env)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "unknown action" in wrong.stderr
    added = pneumoscope("users", "add", f"nurse{int(time.time())}", "--password-stdin", env=app_backend.env,
                        stdin="a-long-nurse-password\n")
    assert added.returncode == 0, added.stderr
    console = audit_lines(app_backend, action="user_added")
    assert console and console[-1].actor.startswith("console:") and console[-1].client == "cli"
    assert audit_lines(app_backend, action="audit_read", client="cli")


def test_migration_0004_upgrades_and_downgrades(app_backend, tmp_path, request):
    from alembic import command

    from webapp.db import _alembic_config, current_revision, head_revision, make_engine, upgrade

    if app_backend.name == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'migrations.db'}")
    else:
        engine = make_engine(request.getfixturevalue("postgres").create_database("migration_tests"))
    assert upgrade(engine, "0001") == "0001"
    assert upgrade(engine) == head_revision()
    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert current_revision(engine) == "0001"
    with engine.connect() as connection:
        tables = {row[0] for row in connection.execute(text(
            "SELECT name FROM sqlite_master WHERE type='table'" if app_backend.name == "sqlite" else
            "SELECT tablename FROM pg_tables WHERE schemaname='public'"))}
    assert "audit_events" not in tables and "studies" in tables
    assert upgrade(engine) == head_revision()
    engine.dispose()

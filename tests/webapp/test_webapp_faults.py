"""Faults under the web app; nothing accepted is lost, and nothing is half-stored.

- The real PostgreSQL 15 stopped (clients refused) and crashed (``pg_ctl stop -m immediate``) and started again
  while 8 clients upload to a real web app process: every upload is answered 202 (stored, pending) or 503 with
  Retry-After; afterwards every accepted study has its row and its whole file, no row lacks a file and no file
  lacks a row.
- SQLite on a full filesystem (a small tmpfs): with images and database on it, and with only the database on it.
- S3 (moto_server behind a fault-injecting proxy) refusing connections or cutting an upload halfway: 503 after
  retries with back-off, no row, no object; back again: stored.
- The transformer and then the predictor SIGKILLed under 8 uploading clients (the real serving stack, which
  restarts them as a kubelet would): every upload ends ``done`` or ``pending``, the pending ones are scored after
  recovery; 0 lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fault_proxy import FaultProxy
from serving_fixtures import xray_files
from webapp_fixtures import (api_token, assert_rows_and_files_agree, free_port, full_res_xrays, make_bucket, rows,
                             running_postgres, s3_environment, stack_child_pid, start_web)

pytestmark = pytest.mark.integration

PASSWORD = "a-long-test-password"
CLIENTS = 8


# -- helpers ---------------------------------------------------------------------------------------------

@dataclass
class Outcomes:
    """Every answer the uploading clients got, with the time (s since start) and the study id when stored."""
    answers: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, at: float, status: int | str, study: int | None = None, retry_after: str | None = None):
        with self.lock:
            self.answers.append((at, status, study, retry_after))

    def statuses(self) -> Counter:
        return Counter(status for _, status, _, _ in self.answers)

    def accepted(self) -> set[int]:
        return {study for _, status, study, _ in self.answers if status in (201, 202)}


def upload_continuously(url: str, token: str, files: list[Path], outcomes: Outcomes, stop: threading.Event,
                        started: float, pause: float = 0.0, timeout: float = 60.0) -> None:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=timeout) as api:
        i = 0
        while not stop.is_set():
            path = files[i % len(files)]
            i += 1
            try:
                response = api.post("/api/studies", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
            except httpx.HTTPError as exc:
                outcomes.add(time.monotonic() - started, type(exc).__name__)
                time.sleep(0.2)
                continue
            study = response.json().get("id") if response.status_code in (201, 202) else None
            outcomes.add(time.monotonic() - started, response.status_code, study,
                         response.headers.get("retry-after"))
            time.sleep(0.2 if response.status_code == 503 else pause)


@contextlib.contextmanager
def load(url: str, token: str, files: list[Path], clients: int = CLIENTS, pause: float = 0.0):
    """``clients`` threads uploading until the block ends; ``pause``: seconds between one client's uploads."""
    outcomes, stop, started = Outcomes(), threading.Event(), time.monotonic()
    threads = [threading.Thread(target=upload_continuously, args=(url, token, files[i::clients] or files, outcomes,
                                                                  stop, started, pause), daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)


def wait_until(condition, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} within {timeout:.0f} s")


# -- PostgreSQL stopped, crashed and started under load --------------------------------------------------

def test_uploads_while_postgresql_stops_crashes_and_restarts_are_refused_cleanly_or_stored_whole(tmp_path):
    files = xray_files(per_class=8)
    # A server of its own (the session's is shared), committing durably: it is crashed below, and an upload
    # answered 202 must survive the crash (with synchronous_commit=off the last commits would be lost).
    with running_postgres(durable=True) as server:
        database = server.create_database("faults")
        env = {"PNEUMOSCOPE_HOME": str(tmp_path), "PNEUMOSCOPE_DATABASE_URL": database,
               "PNEUMOSCOPE_IMAGE_STORE": str(tmp_path / "images"), "PNEUMOSCOPE_SECRET_KEY": "faults",
               "PNEUMOSCOPE_INFERENCE_URL": f"http://127.0.0.1:{free_port()}",  # refused: uploads stay pending
               "PNEUMOSCOPE_INLINE_WAIT_S": "2", "PNEUMOSCOPE_RETRY_INITIAL_S": "0.5", "PNEUMOSCOPE_RETRY_MAX_S": "2",
               "PNEUMOSCOPE_WORKER_POLL_S": "0.25", "PNEUMOSCOPE_ORPHAN_SWEEP_S": "1", "PNEUMOSCOPE_ORPHAN_MIN_AGE_S": "3"}
        token = api_token(env, "doctor", PASSWORD)
        web = start_web(env, tmp_path / "web.log")
        try:
            with load(web.url, token, files) as outcomes:
                time.sleep(3)
                server.stop("fast")  # down: connections refused
                time.sleep(4)
                server.start()
                time.sleep(4)
                server.stop("immediate")  # a crash, transactions in flight
                time.sleep(3)
                server.start()
                stored_before = outcomes.statuses()[202]
                wait_until(lambda: outcomes.statuses()[202] >= stored_before + CLIENTS, 60,
                           "uploads were not stored again after PostgreSQL came back")
            statuses = outcomes.statuses()
            assert set(statuses) <= {202, 503}, statuses  # no 500, no broken connection, nothing else
            assert statuses[503] > 0 and statuses[202] > 0, statuses
            assert all(retry and int(retry) > 0 for _, status, _, retry in outcomes.answers if status == 503)
            assert httpx.get(f"{web.url}/readyz", timeout=10).status_code == 200
            time.sleep(5)  # the retry worker's sweep removes files that no row names (commits of unknown outcome)
            stored = assert_rows_and_files_agree(database, tmp_path / "images")
            accepted = outcomes.accepted()
            assert accepted <= set(stored), f"accepted but lost: {sorted(accepted - set(stored))}"
            assert set(stored) <= accepted, f"stored although refused: {sorted(set(stored) - accepted)}"
            log = (tmp_path / "web.log").read_text()
            assert "Traceback" not in log, log[-3000:]
        finally:
            web.stop()


# -- SQLite on a full filesystem ------------------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(size_mb: int):
    """A tmpfs of ``size_mb`` MiB (root only: mount); unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("a full filesystem is made with a small tmpfs, which needs root to mount")
    where = Path(tempfile.mkdtemp(prefix="pneumoscope-full-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); this test needs one")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(filesystem: Path, leave_bytes: int) -> Path:
    filler = filesystem / "filler"
    free = os.statvfs(filesystem).f_bavail * os.statvfs(filesystem).f_frsize
    with open(filler, "wb") as out:
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            out.write(b"\0" * chunk)
            remaining -= chunk
    return filler


@pytest.mark.parametrize("on_the_small_filesystem", ["database and images", "database only"])
def test_sqlite_on_a_full_filesystem_refuses_uploads_cleanly_and_recovers(tmp_path, on_the_small_filesystem):
    from fastapi.testclient import TestClient

    from webapp import accounts
    from webapp.app import create_app
    from webapp.db import transaction
    from webapp.settings import WebSettings

    films = full_res_xrays(6, offset=20)
    with small_filesystem(24) as small:
        images = small / "images" if on_the_small_filesystem == "database and images" else tmp_path / "images"
        database = f"sqlite:///{small / 'web.db'}"
        settings = WebSettings(home=small, database_url=database, image_store=str(images), secret_key="full",
                               inference_url=f"http://127.0.0.1:{free_port()}", inline_wait_s=1, retry_initial_s=60)
        with TestClient(create_app(settings, start_worker=False)) as client:
            with transaction(client.app.state.ctx.factory) as db:
                accounts.add_user(db, "doctor", PASSWORD)
                token = accounts.issue_token(db, "doctor")[0]
            client.headers["authorization"] = f"Bearer {token}"

            def upload(i: int):
                film = films[i % len(films)]
                return client.post("/api/studies", files={"file": (film.name, film.read_bytes(), "image/jpeg")})

            assert upload(0).status_code == 202
            # leave less room than one more film (images on it) or than a few database pages (database only)
            filler = fill(small, leave_bytes=200_000 if images.is_relative_to(small) else 16_384)
            answers = [upload(i) for i in range(1, 9)]
            refused = [a for a in answers if a.status_code == 503]
            assert refused, [a.status_code for a in answers]
            assert all(a.status_code in (202, 503) for a in answers), [(a.status_code, a.text[:200]) for a in answers]
            assert all(int(a.headers["retry-after"]) > 0 and a.json()["code"] == "unavailable" for a in refused)
            accepted = {a.json()["id"] for a in answers if a.status_code == 202} | {1}
            stored = assert_rows_and_files_agree(database, images)
            assert set(stored) == accepted
            filler.unlink()  # room again: uploads are stored
            again = upload(9)
            assert again.status_code == 202, again.text
            assert set(assert_rows_and_files_agree(database, images)) == accepted | {again.json()["id"]}
            assert client.get("/readyz").status_code == 200


# -- S3 for images: refused, cut halfway, back --------------------------------------------------------------

def test_an_s3_image_store_that_refuses_or_cuts_uploads_gets_retries_then_503_and_keeps_nothing(moto_endpoint,
                                                                                                monkeypatch):
    import boto3
    import s3fs
    from fastapi.testclient import TestClient

    from webapp import accounts
    from webapp.app import create_app
    from webapp.db import transaction
    from webapp.settings import WebSettings

    make_bucket(moto_endpoint, "faults")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")

    def objects() -> set[str]:
        listed = s3.list_objects_v2(Bucket="faults", Prefix="studies/")
        return {o["Key"] for o in listed.get("Contents", [])}

    def by_study(keys: set[str]) -> dict[str, set[str]]:
        """{study's storage prefix: its object names}, from keys studies/<prefix>/<name>."""
        out: dict[str, set[str]] = {}
        for key in keys:
            _, prefix, name = key.split("/", 2)
            out.setdefault(prefix, set()).add(name)
        return out

    #: What one JPEG upload stores: the film and the worklist's thumbnail, nothing else
    one_study = {"image.jpg", "thumbnail.png"}

    film = full_res_xrays(1, offset=30)[0]
    with FaultProxy(int(moto_endpoint.rsplit(":", 1)[1])) as proxy, tempfile.TemporaryDirectory() as home:
        for key, value in s3_environment(proxy.url).items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        settings = WebSettings(home=Path(home), image_store="s3://faults/studies", secret_key="s3-faults",
                               inference_url=f"http://127.0.0.1:{free_port()}", inline_wait_s=1, retry_initial_s=60)
        with TestClient(create_app(settings, start_worker=False)) as client:
            with transaction(client.app.state.ctx.factory) as db:
                accounts.add_user(db, "doctor", PASSWORD)
                client.headers["authorization"] = f"Bearer {accounts.issue_token(db, 'doctor')[0]}"

            def upload():
                return client.post("/api/studies", files={"file": (film.name, film.read_bytes(), "image/jpeg")})

            first = upload()
            assert first.status_code == 202, first.text
            kept = objects()
            assert list(by_study(kept).values()) == [one_study], kept  # one study, stored once
            for mode, cut_after in (("refuse", 0), ("cut", 64 * 1024)):  # down; every PUT cut after 64 KiB
                proxy.set(mode, cut_after)
                before, started = proxy.connections, time.monotonic()
                refused = upload()
                took = time.monotonic() - started
                assert refused.status_code == 503, (mode, refused.text)
                assert refused.headers["retry-after"] and "image store" in refused.json()["error"]
                assert proxy.connections - before >= 3, f"{mode}: the write was not retried"
                assert took < 120, f"{mode}: {took:.0f} s before answering"
                assert objects() == kept, f"{mode}: an object was left behind"
                proxy.set("pass")
            assert set(rows(f"sqlite:///{home}/webapp.db")) == {first.json()["id"]}
            back = upload()
            assert back.status_code == 202, back.text
            stored = rows(f"sqlite:///{home}/webapp.db")
            assert by_study(objects()) == {prefix: one_study for prefix, *_ in stored.values()}
            assert len(stored) == 2
            for key in objects():
                body = s3.get_object(Bucket="faults", Key=key)["Body"].read()
                if key.endswith("/thumbnail.png"):
                    assert body.startswith(b"\x89PNG"), key
                else:  # stored whole: what S3 holds is what was uploaded (metadata stripped)
                    assert hashlib.sha256(body).hexdigest() in {digest for _, _, digest, _ in stored.values()}
        s3fs.S3FileSystem.clear_instance_cache()


# -- the transformer and the predictor SIGKILLed under load -----------------------------------------------

def test_transformer_and_predictor_killed_under_load_lose_no_upload(web_stack):
    token = api_token(web_stack.env)
    files = full_res_xrays(8, offset=40)
    with load(web_stack.web, token, files, pause=1.0) as outcomes:  # 8 doctors, one upload a second each
        time.sleep(3)
        os.kill(stack_child_pid(web_stack, "serving.transformer_main"), signal.SIGKILL)
        time.sleep(5)
        os.kill(stack_child_pid(web_stack, "serving.predictor_main"), signal.SIGKILL)
        time.sleep(4)
    statuses = outcomes.statuses()
    assert set(statuses) <= {201, 202}, statuses  # the web app stored every upload: scored, or pending
    assert statuses[202] > 0, f"no upload found the services down: {statuses}"
    accepted = outcomes.accepted()
    with httpx.Client(base_url=web_stack.web, headers={"authorization": f"Bearer {token}"}, timeout=30) as api:
        def all_done():
            states = {study: api.get(f"/api/studies/{study}").json()["status"] for study in accepted}
            return states if set(states.values()) == {"done"} else None

        wait_until(all_done, 240, "the pending studies were not all scored after recovery", step=2)
        lost = [study for study in accepted if api.get(f"/api/studies/{study}").status_code != 200]
    assert not lost, f"lost: {lost}"
    print(f"{len(accepted)} uploads under kills: {statuses[201]} scored at once, {statuses[202]} pending then "
          "scored, 0 lost")

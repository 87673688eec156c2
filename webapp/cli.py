"""``pneumoscope web``, ``db``, ``users`` and ``studies`` (plugged into ``model.cli`` by entry point).

Nothing heavy is imported at module level: ``model.cli`` builds every command's parser on each call.
"""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path


def add_commands(commands) -> None:
    web = commands.add_parser(
        "web", help="run the doctor's web app",
        description="Serve the web app (pages, JSON API at /api, OpenAPI at /openapi.json) with uvicorn. "
                    "Applies database migrations first; retries pending studies in the background. Settings "
                    "come from PNEUMOSCOPE_* environment variables under these flags.")
    _settings_flags(web, every=True)
    web.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    web.set_defaults(func=cmd_web)

    db = commands.add_parser("db", help="the web app's database").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the database migrations (the app also does this at start)")
    _settings_flags(up)
    up.set_defaults(func=cmd_db_upgrade)
    current = db.add_parser("current", help="print the database's migration revision")
    _settings_flags(current)
    current.set_defaults(func=cmd_db_current)

    users = commands.add_parser("users", help="web app accounts and API tokens").add_subparsers(
        dest="users_command", required=True)
    add = users.add_parser("add", help="create a user (password prompted, or read from stdin)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--admin", action="store_true", help="may see every user's studies")
    _password_flags(add)
    add.add_argument("--if-missing", action="store_true", help="do nothing (exit 0) when the user exists")
    _settings_flags(add)
    add.set_defaults(func=cmd_users_add)
    passwd = users.add_parser("set-password", help="set a new password (signs the user out everywhere)")
    passwd.add_argument("name", metavar="NAME")
    _password_flags(passwd)
    _settings_flags(passwd)
    passwd.set_defaults(func=cmd_users_set_password)
    listing = users.add_parser("list", help="list users")
    _settings_flags(listing)
    listing.set_defaults(func=cmd_users_list)
    token = users.add_parser("token", help="issue a personal API token (printed once; stored hashed)")
    token.add_argument("name", metavar="NAME")
    token.add_argument("--label", default="", help="what the token is for")
    _settings_flags(token)
    token.set_defaults(func=cmd_users_token)
    tokens = users.add_parser("tokens", help="list a user's API tokens (ids, labels, state)")
    tokens.add_argument("name", metavar="NAME")
    _settings_flags(tokens)
    tokens.set_defaults(func=cmd_users_tokens)
    revoke = users.add_parser("revoke-token", help="revoke an API token (the token itself or its id), or --all")
    revoke.add_argument("token", metavar="TOKEN_OR_ID", nargs="?")
    revoke.add_argument("--all", metavar="NAME", help="revoke every token of this user")
    _settings_flags(revoke)
    revoke.set_defaults(func=cmd_users_revoke)

    studies = commands.add_parser("studies", help="the web app's studies").add_subparsers(
        dest="studies_command", required=True)
    export = studies.add_parser(
        "export", help="write reviewed studies as labelled training data (Kaggle layout)",
        description="Write every study a doctor confirmed or corrected to DIR/train/{NORMAL,PNEUMONIA}/ "
                    "(the layout `pneumoscope data prepare` and the pipeline read), labelled with the doctor's "
                    "label, plus DIR/pneumoscope-export.json. DICOM files are written as stored (de-identified).")
    export.add_argument("out", metavar="DIR")
    export.add_argument("--only-corrected", action="store_true", help="only studies the doctor corrected")
    _settings_flags(export)
    export.set_defaults(func=cmd_studies_export)

    audit = commands.add_parser(
        "audit", help="read the web app's audit log (who did what to which study, when)",
        description="Print the audit log, newest first: one line per event (time, user, action, study, client, "
                    "detail), or JSON lines with --json. The log is append-only; reading it is recorded too.")
    audit.add_argument("--user", help="one user's events")
    audit.add_argument("--study", type=int, help="one study's events")
    audit.add_argument("--action", help="one action (signed_in, viewed, exported, confirmed, corrected, ...)")
    audit.add_argument("--since", metavar="YYYY-MM-DD", help="on or after this day (UTC)")
    audit.add_argument("--until", metavar="YYYY-MM-DD", help="on or before this day (UTC)")
    audit.add_argument("--limit", type=int, default=100, help="at most this many lines (default: 100)")
    audit.add_argument("--json", action="store_true", help="JSON lines")
    _settings_flags(audit)
    audit.set_defaults(func=cmd_audit)


def _settings_flags(parser, every: bool = False) -> None:
    """The web app's settings as flags: all of them for ``web``, where its data lives for the others."""
    from model.settings_cli import add_settings_flags
    from webapp.settings import WebSettings

    add_settings_flags(parser, WebSettings, only=None if every else ("home", "database_url", "image_store"))


def _password_flags(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    group.add_argument("--generate-password", action="store_true",
                       help="make a random password and print it once")


def settings_from(args):
    from model.settings_cli import settings_from_args
    from webapp.settings import WebSettings

    return settings_from_args(WebSettings, args)


def _engine(args):
    from model.cli import CommandError
    from webapp.db import DatabaseError, make_engine, upgrade

    settings = settings_from(args)
    try:
        engine = make_engine(settings.resolved_database_url())
        upgrade(engine)
    except DatabaseError as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:  # a malformed URL, a missing driver
        raise CommandError(f"cannot open the database: {str(exc).splitlines()[0]}") from None
    return engine, settings


def _transaction(args):
    from webapp.db import session_factory, transaction

    engine, settings = _engine(args)
    return transaction(session_factory(engine))


def _read_password(args, confirm: bool = True) -> tuple[str, bool]:
    """(password, generated)."""
    import secrets

    from model.cli import CommandError

    if args.generate_password:
        return secrets.token_urlsafe(15), True
    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("no password on stdin (one line expected)")
        return password, False
    password = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Repeat it: ") != password:
        raise CommandError("the two passwords differ")
    return password, False


def _audit(db, action: str, detail: str = "", study_id: int | None = None) -> None:
    """An audit line for what an operator did at the console (in the transaction of the change)."""
    from webapp import audit

    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        who = "unknown"
    audit.record(db, action, f"{audit.CONSOLE}:{who}"[:64], study_id, client="cli", detail=detail)


# -- commands -----------------------------------------------------------------------------------------

def cmd_web(args) -> int:
    import logging

    import uvicorn

    from model.cli import CommandError
    from webapp.app import create_app
    from webapp.db import DatabaseError
    from webapp.storage import ImageStore, StorageError

    settings = settings_from(args)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _engine(args)[0].dispose()  # fail fast, in one line, on a database that cannot be reached or migrated
    try:
        ImageStore(settings.resolved_image_store()).check()
    except StorageError as exc:
        raise CommandError(str(exc)) from None
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            access_log=settings.access_log, proxy_headers=True,
                            forwarded_allow_ips=settings.forwarded_allow_ips, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    try:
        server.run()
    except (DatabaseError, StorageError) as exc:
        raise CommandError(str(exc)) from None
    # uvicorn swallows lifespan failures and exits; say so in one line.
    if not server.started:
        raise CommandError(f"the web app did not start on {settings.host}:{settings.port} (see the log above)")
    return 0


def cmd_db_upgrade(args) -> int:
    from webapp.db import current_revision

    engine, _ = _engine(args)
    print(f"database at revision {current_revision(engine)}")
    return 0


def cmd_db_current(args) -> int:
    from webapp.db import current_revision, head_revision, make_engine

    engine = make_engine(settings_from(args).resolved_database_url())
    current = current_revision(engine)
    print(f"{current or 'empty'} (head: {head_revision()})")
    return 0


def cmd_users_add(args) -> int:
    from webapp import accounts

    with _transaction(args) as db:
        if args.if_missing and accounts.find_user(db, args.name) is not None:
            print(f"user {args.name} exists already (its password was shown when it was made; "
                  f"`pneumoscope users set-password {args.name}` sets a new one)")
            return 0
        password, generated = _read_password(args)
        accounts.add_user(db, args.name, password, admin=args.admin)
        _audit(db, "user_added", f"{args.name}{' (admin)' if args.admin else ''}")
    role = "admin" if args.admin else "user"
    if generated:
        print(f"created {role} {args.name} with password: {password}")
        print("(shown only this once; it is stored hashed)")
    else:
        print(f"created {role} {args.name}")
    return 0


def cmd_users_set_password(args) -> int:
    from webapp import accounts

    with _transaction(args) as db:
        accounts.require_user(db, args.name)
        password, generated = _read_password(args)
        accounts.set_password(db, args.name, password)
        _audit(db, "password_changed", args.name)
    print(f"new password for {args.name}: {password}" if generated else f"password of {args.name} changed")
    return 0


def cmd_users_list(args) -> int:
    from sqlalchemy import select

    from webapp.models import User

    with _transaction(args) as db:
        for user in db.scalars(select(User).order_by(User.username)):
            print(f"{user.username}\t{'admin' if user.is_admin else 'user'}\tsince {user.created_at:%Y-%m-%d}")
    return 0


def cmd_users_token(args) -> int:
    from webapp import accounts

    with _transaction(args) as db:
        token, row = accounts.issue_token(db, args.name, args.label)
        token_id = row.id
        _audit(db, "token_issued", f"{args.name}: token {token_id}")
    print(token)
    print(f"(token id {token_id}; shown only this once; send it as 'Authorization: Bearer <token>'; revoke with "
          f"`pneumoscope users revoke-token {token_id}`)", file=sys.stderr)
    return 0


def cmd_users_tokens(args) -> int:
    from webapp import accounts

    with _transaction(args) as db:
        for row in accounts.list_tokens(db, args.name):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            used = f"last used {row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never used"
            print(f"{row.id}\t{state}\t{used}\t{row.label}")
    return 0


def cmd_users_revoke(args) -> int:
    from model.cli import CommandError
    from webapp import accounts

    if bool(args.token) == bool(args.all):
        raise CommandError("give one TOKEN_OR_ID, or --all NAME")
    with _transaction(args) as db:
        if args.all:
            count = accounts.revoke_all_tokens(db, args.all)
            _audit(db, "token_revoked", f"{args.all}: all ({count})")
            print(f"revoked {count} token{'s' if count != 1 else ''} of {args.all}")
        else:
            rows = accounts.revoke_token(db, args.token)
            _audit(db, "token_revoked", f"token {', '.join(str(r.id) for r in rows)}")
            print(f"revoked token {', '.join(str(r.id) for r in rows)}")
    return 0


def cmd_studies_export(args) -> int:
    from model.cli import CommandError
    from webapp.db import session_factory
    from webapp.storage import ImageStore
    from webapp.studies import export_reviewed

    engine, settings = _engine(args)
    store = ImageStore(settings.resolved_image_store())
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out} exists and is not a folder")
    factory = session_factory(engine)
    result = export_reviewed(factory, store, out, args.only_corrected)
    from webapp.db import transaction

    with transaction(factory) as db:
        for study_id in result["studies"]:
            _audit(db, "exported", f"training export to {out.name}"[:200], study_id)
    print(json.dumps({k: v for k, v in result.items() if k != "studies"}))
    return 0


def cmd_audit(args) -> int:
    from datetime import date

    from model.cli import CommandError
    from webapp import audit

    try:
        since = date.fromisoformat(args.since) if args.since else None
        until = date.fromisoformat(args.until) if args.until else None
    except ValueError:
        raise CommandError("--since and --until take a day as YYYY-MM-DD") from None
    if args.action and args.action not in audit.ACTIONS:
        raise CommandError(f"unknown action {args.action!r}; one of {', '.join(audit.ACTIONS)}")
    if args.limit < 1:
        raise CommandError(f"--limit must be >= 1, got {args.limit}")
    f = audit.AuditFilter(args.user, args.study, args.action, since, until, page=1, per_page=args.limit)
    with _transaction(args) as db:
        lines, total = audit.search(db, f)
        rows = [audit.as_dict(line) for line in lines]
        _audit(db, "audit_read", f"{len(rows)} of {total} lines")
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            study = f"study {row['study_id']}" if row["study_id"] else "-"
            print(f"{row['at']}\t{row['actor']}\t{row['action']}\t{study}\t{row['client']}\t{row['detail']}")
    if total > len(rows):
        print(f"({total - len(rows)} older lines not shown; --limit N shows more)", file=sys.stderr)
    return 0

"""The schema's migrations: the head matches the models, and each migration after the first goes down and up again
without losing the rows it does not own (SQLite here; PostgreSQL runs them in test_webapp_api.py)."""

from __future__ import annotations

from sqlalchemy import inspect, text


def _columns(engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_the_head_schema_has_every_column_of_the_models(tmp_path):
    from webapp.db import make_engine, upgrade
    from webapp.models import Base

    engine = make_engine(f"sqlite:///{tmp_path / 'head.db'}")
    upgrade(engine)
    for table in Base.metadata.sorted_tables:
        assert _columns(engine, table.name) == {c.name for c in table.columns}, table.name


def test_the_patient_age_migration_is_additive_and_reversible(tmp_path):
    from alembic import command

    from webapp.db import _alembic_config, current_revision, make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'web.db'}")
    upgrade(engine, "0001")
    with engine.begin() as db:  # a study scored before decisions existed
        db.execute(text("INSERT INTO users (id, username, password_hash, is_admin, created_at) "
                        "VALUES (1, 'doc', 'x', 0, '2026-01-01')"))
        db.execute(text("INSERT INTO studies (id, owner_id, created_at, status, note, storage_prefix, image_format, "
                        "image_sha256, image_bytes, has_preview, deidentified, probability, label, has_heatmap, "
                        "attempts) VALUES (1, 1, '2026-01-01', 'done', '', 'p', 'jpeg', 'h', 1, 0, 0, 0.9, "
                        "'PNEUMONIA', 0, 1)"))
    upgrade(engine, "0004")
    added = {"patient_age_token"}
    assert not added & _columns(engine, "studies")
    upgrade(engine, "0005")
    assert added <= _columns(engine, "studies")
    with engine.connect() as db:
        row = db.execute(text("SELECT label, probability, decision, in_intended_use FROM studies")).one()
    assert tuple(row) == ("PNEUMONIA", 0.9, None, None)  # the old result stands; its decision is unknown
    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")
    assert current_revision(engine) == "0004" and not added & _columns(engine, "studies")
    with engine.connect() as db:
        assert db.execute(text("SELECT label FROM studies")).scalar_one() == "PNEUMONIA"
    upgrade(engine, "0005")
    assert added <= _columns(engine, "studies")

"""Initial schema: users, API tokens, sessions, failed sign-ins, studies.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("login_failures",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("username", sa.String(length=64), nullable=False),
    sa.Column("client", sa.String(length=64), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("login_failures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_login_failures_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_login_failures_client"), ["client"], unique=False)
        batch_op.create_index(batch_op.f("ix_login_failures_username"), ["username"], unique=False)
    op.create_table("users",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("username", sa.String(length=64), nullable=False),
    sa.Column("password_hash", sa.String(length=255), nullable=False),
    sa.Column("is_admin", sa.Boolean(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("username")
    )
    op.create_table("api_tokens",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("user_id", sa.Integer(), nullable=False),
    sa.Column("label", sa.String(length=100), nullable=False),
    sa.Column("token_hash", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("token_hash")
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_user_id"), ["user_id"], unique=False)
    op.create_table("studies",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("owner_id", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
    sa.Column("storage_prefix", sa.String(length=64), nullable=False),
    sa.Column("image_format", sa.String(length=8), nullable=False),
    sa.Column("image_sha256", sa.String(length=64), nullable=False),
    sa.Column("image_bytes", sa.Integer(), nullable=False),
    sa.Column("has_preview", sa.Boolean(), nullable=False),
    sa.Column("deidentified", sa.Boolean(), nullable=False),
    sa.Column("probability", sa.Float(), nullable=True),
    sa.Column("label", sa.String(length=16), nullable=True),
    sa.Column("threshold", sa.Float(), nullable=True),
    sa.Column("model_name", sa.String(length=100), nullable=True),
    sa.Column("model_version", sa.String(length=100), nullable=True),
    sa.Column("quality_flags", sa.JSON(), nullable=True),
    sa.Column("has_heatmap", sa.Boolean(), nullable=False),
    sa.Column("scored_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("inference_ms", sa.Float(), nullable=True),
    sa.Column("rejection", sa.Text(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("feedback", sa.String(length=16), nullable=True),
    sa.Column("feedback_label", sa.String(length=16), nullable=True),
    sa.Column("feedback_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("feedback_by_id", sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(["feedback_by_id"], ["users.id"], ),
    sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("storage_prefix")
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_studies_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_feedback"), ["feedback"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_label"), ["label"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_next_attempt_at"), ["next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_status"), ["status"], unique=False)
    op.create_table("web_sessions",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("token_hash", sa.String(length=64), nullable=False),
    sa.Column("user_id", sa.Integer(), nullable=False),
    sa.Column("csrf_token", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("token_hash")
    )
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_web_sessions_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_web_sessions_user_id"), ["user_id"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_web_sessions_user_id"))
        batch_op.drop_index(batch_op.f("ix_web_sessions_expires_at"))
    op.drop_table("web_sessions")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_status"))
        batch_op.drop_index(batch_op.f("ix_studies_owner_id"))
        batch_op.drop_index(batch_op.f("ix_studies_next_attempt_at"))
        batch_op.drop_index(batch_op.f("ix_studies_label"))
        batch_op.drop_index(batch_op.f("ix_studies_feedback"))
        batch_op.drop_index(batch_op.f("ix_studies_created_at"))
    op.drop_table("studies")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_user_id"))
    op.drop_table("api_tokens")
    op.drop_table("users")
    with op.batch_alter_table("login_failures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_login_failures_username"))
        batch_op.drop_index(batch_op.f("ix_login_failures_client"))
        batch_op.drop_index(batch_op.f("ix_login_failures_at"))
    op.drop_table("login_failures")

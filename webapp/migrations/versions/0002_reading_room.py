"""Reading room (issue 16): the served answer's decision and uncertainty, the CAM and its lung share, the
identifying fields (one encrypted token), the DICOM display copy's description, and report versions.

Additive: new nullable columns on ``studies`` and a new table; downgrade drops them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STUDY_COLUMNS = (
    ("decision", sa.String(length=16)),
    ("refer_reasons", sa.JSON()),
    ("ood_score", sa.Float()),
    ("in_intended_use", sa.Boolean()),
    ("model_info", sa.JSON()),
    ("cam", sa.JSON()),
    ("lung_mask", sa.JSON()),
    ("cam_lung_share", sa.Float()),
    ("lung_share_source", sa.String(length=32)),
    ("identity", sa.Text()),
    ("display", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        for name, column_type in STUDY_COLUMNS:
            batch_op.add_column(sa.Column(name, column_type, nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_decision"), ["decision"], unique=False)
    op.create_table("report_versions",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("impression", sa.Text(), nullable=False),
    sa.Column("corrects", sa.Integer(), nullable=True),
    sa.Column("correction_reason", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_by_id", sa.Integer(), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("signed_by_id", sa.Integer(), nullable=True),
    sa.Column("patient", sa.Text(), nullable=True),
    sa.Column("finding", sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["created_by_id"], ["users.id"]),
    sa.ForeignKeyConstraint(["signed_by_id"], ["users.id"]),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("study_id", "version")
    )
    with op.batch_alter_table("report_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_versions_study_id"), ["study_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("report_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_versions_study_id"))
    op.drop_table("report_versions")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_decision"))
        for name, _ in reversed(STUDY_COLUMNS):
            batch_op.drop_column(name)

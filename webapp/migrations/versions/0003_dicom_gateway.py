"""DICOM gateway: a study's source (upload | PACS), the original's modules kept encrypted until the results are sent,
the instances the gateway received and the results waiting to go back to the PACS.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=16), server_default="upload", nullable=False))
        batch_op.add_column(sa.Column("pacs_original", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_source"), ["source"], unique=False)
    op.create_table("gateway_instances",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("fingerprint", sa.String(length=64), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("reason", sa.String(length=200), nullable=True),
    sa.Column("calling_ae", sa.String(length=16), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("study_id", sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="SET NULL"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("fingerprint")
    )
    with op.batch_alter_table("gateway_instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gateway_instances_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_gateway_instances_study_id"), ["study_id"], unique=False)
    op.create_table("gateway_outbox",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("instance_id", sa.Integer(), nullable=False),
    sa.Column("kind", sa.String(length=8), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("blob_key", sa.String(length=200), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(["instance_id"], ["gateway_instances.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("sop_instance_uid")
    )
    with op.batch_alter_table("gateway_outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gateway_outbox_instance_id"), ["instance_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_gateway_outbox_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_gateway_outbox_next_attempt_at"), ["next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_table("gateway_outbox")
    op.drop_table("gateway_instances")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_source"))
        batch_op.drop_column("pacs_original")
        batch_op.drop_column("source")

"""The decision every answer names (issue 17): decision, ood_score, in_intended_use, refer_reasons, the answering
version's intended use, and the patient's age (encrypted) read from DICOM before de-identification.

Additive: nullable columns and one index; studies scored before it keep NULL (their label still stands).

Revision ID: 0005
Revises: 0001
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decision", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("ood_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("in_intended_use", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("refer_reasons", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("model_intended_use", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("patient_age_token", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_decision"), ["decision"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_decision"))
        batch_op.drop_column("patient_age_token")
        batch_op.drop_column("model_intended_use")
        batch_op.drop_column("refer_reasons")
        batch_op.drop_column("in_intended_use")
        batch_op.drop_column("ood_score")
        batch_op.drop_column("decision")

"""The patient's age for the model's intended use (issue 17): a DICOM film's Patient's Age, read before
de-identification and kept as a Fernet token, so that a retry can still apply the version's age limit. The
decision fields themselves (decision, ood_score, in_intended_use, refer_reasons, model_info) came with 0002.

Additive: one nullable column; studies stored before it have no age (the predictor treats it as unknown).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_age_token", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("patient_age_token")

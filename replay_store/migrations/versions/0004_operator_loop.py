"""operator loop: predictions (what the review queue ranks), leases (single-flight updates), alert centroids and
alert snapshots in the alert log, the reason an update run was asked for

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 02:15:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("sample_id", ID, autoincrement=False, nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("top_classes", sa.JSON(), nullable=False),
        sa.Column("anomaly_score", sa.Float(), nullable=True),
        sa.Column("anomaly_threshold", sa.Float(), nullable=True),
        sa.Column("anomalous", sa.Boolean(), nullable=False),
        sa.Column("alert_id", ID, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sample_id"),
    )
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_predictions_anomalous"), ["anomalous"], unique=False)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("centroid", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alert", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("update_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_reason", sa.String(length=2048), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("update_runs", schema=None) as batch_op:
        batch_op.drop_column("request_reason")
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.drop_column("alert")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("centroid")
    op.drop_table("leases")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_predictions_anomalous"))
    op.drop_table("predictions")

"""replay buffer: embeddings (the truth behind the FAISS index) and exemplars (with stored logits)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 17:05:19.624323
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "embeddings",
        sa.Column(
            "sample_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False
        ),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sample_id", "model_version"),
    )
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.create_index("ix_embeddings_model_version_sample", ["model_version", "sample_id"], unique=False)

    op.create_table(
        "exemplars",
        sa.Column(
            "sample_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False
        ),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("selected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("logits", sa.LargeBinary(), nullable=True),
        sa.Column("logits_classes", sa.JSON(), nullable=True),
        sa.Column("logits_model_version", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["class_name"],
            ["classes.name"],
        ),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sample_id"),
    )
    with op.batch_alter_table("exemplars", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_exemplars_class_name"), ["class_name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("exemplars", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_exemplars_class_name"))

    op.drop_table("exemplars")
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.drop_index("ix_embeddings_model_version_sample")

    op.drop_table("embeddings")

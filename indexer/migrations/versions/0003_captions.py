"""Captions: one per distinct image content, with the model and prompt that wrote it, full-text indexed
(an FTS5 table with Porter stemming, kept in step by triggers, on SQLite; a GIN index over English
text search vectors on PostgreSQL).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "captions",
        sa.Column("embedding_id", sa.Integer, sa.ForeignKey("embeddings.id"), primary_key=True),
        sa.Column("caption", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE captions_fts USING fts5(caption, content='captions', content_rowid='embedding_id', "
            "tokenize='porter unicode61')"
        )
        op.execute(
            "CREATE TRIGGER captions_ai AFTER INSERT ON captions BEGIN "
            "INSERT INTO captions_fts(rowid, caption) VALUES (new.embedding_id, new.caption); END"
        )
        op.execute(
            "CREATE TRIGGER captions_ad AFTER DELETE ON captions BEGIN "
            "INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', old.embedding_id, old.caption); END"
        )
        op.execute(
            "CREATE TRIGGER captions_au AFTER UPDATE ON captions BEGIN "
            "INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', old.embedding_id, old.caption); "
            "INSERT INTO captions_fts(rowid, caption) VALUES (new.embedding_id, new.caption); END"
        )
    elif dialect == "postgresql":
        op.execute("CREATE INDEX ix_captions_fts ON captions USING GIN (to_tsvector('english', caption))")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE captions_fts")
    op.drop_table("captions")

"""Byte-order collation for files.path on PostgreSQL.

The catalog selects a folder's files with a range on `path` (path >= 'dir/' and < 'dir0'),
which the unique index on `path` serves. That needs paths compared byte by byte, as SQLite does; a
locale collation such as en_US.UTF-8 ignores punctuation like '/' at first and breaks the range.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE files ALTER COLUMN path TYPE text COLLATE "C"')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE files ALTER COLUMN path TYPE text COLLATE "default"')

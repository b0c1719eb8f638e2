"""An index of the skipped files' paths, and of no others (a partial index).

`GET /api/images?status=skipped` lists the files an index run could not read, by path. Skipped files
are few among many, and finding a page of them through the index of every path read all the
indexed paths before them: 0.1 s a million files (measured on SQLite and PostgreSQL), every page.
This index holds only the skipped files, so a page reads its own rows; it costs nothing to keep for
the indexed files, which are most. Building it reads the files table once, at the first open by this
version (0.1 s for 1,000,000 rows on PostgreSQL, measured).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SKIPPED = sa.text("status = 'skipped'")


def upgrade() -> None:
    op.create_index("ix_files_skipped_path", "files", ["path"], sqlite_where=SKIPPED, postgresql_where=SKIPPED)


def downgrade() -> None:
    op.drop_index("ix_files_skipped_path", "files")

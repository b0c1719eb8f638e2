"""A trigram index of files.path on PostgreSQL, where pg_trgm can be created.

A `--path` glob that does not start with a folder ('*2019*', '*/holidays/*.jpg') has no range of
the path index to read: finding the few files it matches read every path, 0.13 s a million files
(measured), for every such search or page. PostgreSQL's pg_trgm indexes the paths' three-character
pieces, and the planner then finds a rare glob's matches through it, for the LIKE and the regular
expressions that `indexer.path_glob` writes, without a change to them.

pg_trgm ships with PostgreSQL's contrib modules and is a trusted extension from PostgreSQL 13: a
user with the CREATE privilege on the database may create it. Where it is missing, not allowed, or
installed in a schema off the search path, the catalog goes on without the index (in a savepoint,
so the migration's transaction is not lost), and such globs read every path as before. Building it
reads every path once: 8 s a million files on this project's 2-core machine, measured; commands
opening the catalog meanwhile wait for the migration. A million 32-character paths take 54 MiB in
it (the table 104 MiB), and writing a path costs about 14 us more (`benchmarks/RESULTS.md`). SQLite
has no such index: there such globs read every path.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
from sqlalchemy.exc import DatabaseError

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEX = "ix_files_path_trgm"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            bind.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {INDEX} ON files USING gin (path gin_trgm_ops)")
    except DatabaseError:  # not installed on the server, not this user's to create, or not found
        return


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {INDEX}")

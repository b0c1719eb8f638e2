"""The catalog's vectors version: a token in `meta` that every change to the embeddings replaces.

A search opens the FAISS file and has to know it holds the catalog's vectors. Finding out read every
embedding id from the catalog and every id from the file (seconds a million images, a 100,000,000
image catalog's leaf pages). The file now records the version it was reconciled with, and while the
catalog still has that version, nothing has changed since (`IndexStore.save_vectors`). Each catalog
starts from a random token, so a FAISS file cannot match a catalog it was never reconciled with.

Revision ID: 0005
Revises: 0004
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(sa.text("INSERT INTO meta (key, value) VALUES ('vectors_version', :token)")
               .bindparams(token=uuid.uuid4().hex))


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM meta WHERE key = 'vectors_version'"))

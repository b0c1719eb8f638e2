"""Typed errors of the indexer; the edge maps them to exit codes and HTTP statuses."""

from __future__ import annotations

from retrieval.errors import BlipsearchError


class IndexBusyError(BlipsearchError):
    exit_code = 3


class IndexNotFoundError(BlipsearchError):
    exit_code = 2


class IndexNotWritableError(BlipsearchError):
    """The index directory cannot be written (a read-only mount, no permission): it can be searched only."""

    exit_code = 2


class CatalogVersionError(BlipsearchError):
    exit_code = 2


class CatalogUnavailableError(BlipsearchError):
    """A catalog URL that is not one, names a database without its driver, or cannot be connected to."""

    exit_code = 2


class CatalogConnectionError(BlipsearchError):
    """The catalog's server went away mid-run (a restart, a failover, a dropped network): nothing the
    caller did, and the same command works again once it is back."""

    exit_code = 1


class IndexSettingsError(BlipsearchError):
    """The index directory's settings file (index type, memory budget) cannot be read."""

    exit_code = 2

"""Typed errors of the model layer. The edge (api/) turns them into exit codes and HTTP bodies."""

from __future__ import annotations


class BlipsearchError(Exception):
    """Base class of every error blipsearch reports to a user in its own words."""

    exit_code = 1


class UsageError(BlipsearchError):
    """A request that cannot mean anything: an empty query, k <= 0, a bad option value."""

    exit_code = 2


class ModelNotFoundError(BlipsearchError):
    """The weights are neither in a local directory nor downloadable."""

    exit_code = 2

    def __init__(self, model: str, looked_in: str, reason: str = "", option: str = "--model",
                 local: bool = False) -> None:
        self.model = model
        self.looked_in = looked_in
        self.reason = reason
        if local:  # the user named a directory: a download command for it would make no sense
            lines = [
                f"model {model!r} is not available: {looked_in}" + (f": {reason}" if reason else "") + ".",
                f"Pass {option} DIR with the directory that holds the checkpoint (its config.json and weights), "
                "or a hub id.",
            ]
        else:
            lines = [
                f"model {model!r} is not available: it is not in the model cache {looked_in}"
                + (f" ({reason})" if reason else "") + ".",
                f"Download it on a connected machine (hf download {model} --local-dir DIR) and pass {option} DIR, "
                "or point HF_HOME at a cache that holds it.",
            ]
        super().__init__("\n".join(lines))


class ModelMismatchError(BlipsearchError):
    """An index built with one model is used with another."""

    exit_code = 2

"""Error types with messages a user can act on.

Every error raised on bad input says *what* is wrong, *where* (file, line,
option) and *how to fix it*. The CLI prints these without a traceback.
"""

from __future__ import annotations


class ULDError(Exception):
    """Base class: a problem the user can fix (bad input, bad option, missing data)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix:   {fix}")
        super().__init__("\n".join(parts))


class ConfigError(ULDError):
    """An impossible or inconsistent parameter."""


class DatasetError(ULDError):
    """A dataset that is missing, unknown, or malformed."""


class StoreError(ULDError):
    """A feature store or table that is missing, corrupt or does not match the request."""


class BackboneError(ULDError):
    """A backbone that cannot be found or loaded."""


class BusyError(ULDError):
    """Another process is writing the same feature store or run."""


class WorkspaceError(ULDError):
    """The workspace (or another output folder) cannot be written: read-only, no permission, disk full."""

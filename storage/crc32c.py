"""CRC32C checks of the store's checksummed bytes (Zarr's ``crc32c`` codec), in one numpy-free place.

Shard indexes and chunks are their bytes followed by their little-endian CRC32C.
The CRC32C of such a message *with* its CRC is a constant (the code's residue),
so a check is one pass over the bytes without slicing the CRC off. Used by the
shard-direct reader, the store's cheap verification and the no-op record
(:mod:`storage.completion_cache`, which must not import numpy).
"""

from __future__ import annotations

from typing import Any

#: CRC-32C of any message followed by its own CRC-32C (little-endian).
RESIDUE = 0x48674BC7


def implementation() -> Any:
    """The ``google_crc32c`` module (the CRC32C implementation zarr's codec uses), or None."""
    try:
        import google_crc32c

        return google_crc32c
    except ImportError:
        return None


def self_checks(message_with_crc: bytes) -> bool | None:
    """Do these bytes end in their own CRC32C? None when no CRC32C implementation is installed."""
    crc = implementation()
    if crc is None:
        return None
    return len(message_with_crc) >= 4 and crc.value(message_with_crc) == RESIDUE

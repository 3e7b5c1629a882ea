"""Streaming PyTorch readers over a :class:`storage.features.FeatureStore`.

Reading one image from a sharded Zarr array costs a shard-index lookup plus
one chunk decode per key; reading a *block* of consecutive images costs the
same lookups once. So the dataset keeps one aligned block of images (all
requested keys) in memory, and :class:`BlockShuffleSampler` shuffles blocks
and then images inside each block: each block is decoded once per epoch per
worker while the order still changes every epoch.

Workers re-open the store themselves (a Zarr handle is not shared across
processes), so the dataset pickles only the path and the settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.errors import StoreError
from storage.features import FeatureStore
from storage.locations import is_url

DEFAULT_BLOCK = 16


def _block_size(store: FeatureStore, block: int | None) -> int:
    """A block that divides the shard (so a block never straddles two shard files)."""
    if block is None:
        block = min(DEFAULT_BLOCK, store.shard_size)
    block = max(1, min(int(block), store.shard_size))
    while store.shard_size % block:
        block -= 1
    return block


class FeatureDataset(Dataset):
    """Images ``indices`` of a feature store as ``{"index": int, "features": {key: float32 (C, h, w)}}``.

    ``index`` is the store row (= row of the concatenated manifest), so callers
    can look up ``store.image_ids[index]`` and ``store.crop_boxes[index]``.
    ``block`` images (aligned, default 16) are read and cached at a time.
    """

    def __init__(
        self,
        store: FeatureStore | str | Path,
        indices: Any = None,
        keys: list[str] | None = None,
        block: int | None = None,
    ) -> None:
        self._store: FeatureStore | None = store if isinstance(store, FeatureStore) else None
        # A local Path, or the URL of a store on an object store (each worker process opens it itself).
        self.path = store.path if isinstance(store, FeatureStore) else (store if is_url(store) else Path(store))
        st = self.store
        self.keys = list(st.keys if keys is None else keys)
        st._check_keys(self.keys)
        self.indices = np.arange(len(st), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(st)):
            raise StoreError(f"indices out of range for a store of {len(st)} images", where=str(self.path))
        self.block = _block_size(st, block)
        self._n = len(st)
        self._cache_start = -1
        self._cache: dict[str, np.ndarray] = {}

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore.open(self.path, require_complete=False)
        return self._store

    def __getstate__(self) -> dict:
        # Send only the path to worker processes; each opens its own handle.
        state = self.__dict__.copy()
        state["_store"] = None
        state["_cache"] = {}
        state["_cache_start"] = -1
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def _load_block(self, row: int) -> int:
        start = (row // self.block) * self.block
        if start != self._cache_start:
            self._cache = self.store.read(start, min(start + self.block, self._n), self.keys)
            self._cache_start = start
        return row - start

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        off = self._load_block(row)
        feats = {k: torch.from_numpy(self._cache[k][off].astype(np.float32)) for k in self.keys}
        return {"index": row, "features": feats}


class BlockShuffleSampler(Sampler[int]):
    """Positions into a :class:`FeatureDataset`, shuffled block-wise.

    Blocks (the dataset's cache blocks) come in a random order and images
    inside each block in a random order; a new permutation every epoch
    (seeded by ``seed + epoch``), so runs are reproducible.
    """

    def __init__(self, dataset: FeatureDataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0
        blocks = dataset.indices // dataset.block
        order = np.argsort(blocks, kind="stable")
        _, starts = np.unique(blocks[order], return_index=True)
        self._groups = np.split(order, starts[1:]) if len(order) else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for g in rng.permutation(len(self._groups)):
            yield from (int(p) for p in rng.permutation(self._groups[g]))


def collate_features(items: list[dict]) -> dict:
    """Stack per-image dicts into ``{"index": LongTensor (B,), "features": {key: (B, C, h, w)}}``."""
    keys = items[0]["features"].keys()
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "features": {k: torch.stack([it["features"][k] for it in items]) for k in keys},
    }


def make_loader(
    store: FeatureStore | str | Path,
    indices: Any = None,
    batch_size: int = 16,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    prefetch: int | None = 2,
    keys: list[str] | None = None,
    block: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of batches ``{"index": (B,), "features": {key: float32 (B, C, h, w)}}``.

    ``shuffle`` uses :class:`BlockShuffleSampler` (seeded; call
    ``loader.sampler.set_epoch(e)`` to pin an epoch) so each cache block is
    decoded once per epoch; without it images come in ``indices`` order.
    ``prefetch`` is batches prefetched per worker (only with ``num_workers > 0``).
    """
    if batch_size < 1:
        raise StoreError(f"batch_size must be >= 1, got {batch_size}", where="--batch-size", fix="use a positive batch size")
    ds = FeatureDataset(store, indices, keys=keys, block=block)
    sampler = BlockShuffleSampler(ds, seed=seed) if shuffle else None
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch
        kwargs["persistent_workers"] = False
        # Zarr runs an asyncio loop in a background thread; a fork()ed worker inherits
        # its locks mid-use and can die. Spawned workers start clean (the dataset
        # pickles only the store path, so this is cheap beyond the interpreter start).
        kwargs["multiprocessing_context"] = "spawn"
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_features,
        drop_last=drop_last,
        **kwargs,
    )

"""The view store: hyperfeatures of augmented training crops, next to the main feature store.

A view store is an ordinary :class:`storage.features.FeatureStore` (same keys,
shapes, channel projections, shards, completion markers) whose rows are
*views*: ``n_views`` consecutive rows per training image of the main store, in
the main store's row order. Its extra arrays, under ``views/``, say exactly
what each row shows::

    views/source_row   (n,) int64    row of the plain crop in the main store
    views/view         (n,) int32    view index 0..M-1 of that image
    views/affine       (n, 2, 3) f64 crop px of the plain crop -> crop px of the view (q = A p + b)
    views/flip         (n,) bool     the affine mirrors (left/right parts swap)
    views/jitter       (n, 3) f32    brightness, contrast, saturation factors

so every correspondence between a crop and its view is exact. The store lives
at ``Workspace.view_store(dataset, backbone, main_hash, views_hash)``: keyed by
the main store's hash (feature spec, backbone, manifest) and the hash of the
augmentation config. It is created atomically with those arrays (built in a
temporary folder, then renamed), so a view store never lacks its transforms.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StoreError
from storage.features import FeatureStore

_VIEWS = "views"
KIND = "augmented-views"


class ViewStore:
    """A :class:`FeatureStore` of augmented views plus each row's transform.

    ``store``: the features (read it like any store); ``source_rows``,
    ``views``, ``affine``, ``flip``, ``jitter``: the per-row arrays above;
    ``n_views``: M. :meth:`rows_for` finds the row of (source row, view).
    """

    def __init__(self, store: FeatureStore) -> None:
        import zarr

        self.store = store
        if store.attrs.get("kind") != KIND:
            raise StoreError("feature store is not a view store", where=str(store.path), fix="open views with ViewStore.open on a store made by the augmented-features flow")
        try:
            group = zarr.open_group(str(store.path), mode="r", zarr_format=3)
            self.source_rows = np.asarray(group[f"{_VIEWS}/source_row"][:], dtype=np.int64)
            self.views = np.asarray(group[f"{_VIEWS}/view"][:], dtype=np.int64)
            self.affine = np.asarray(group[f"{_VIEWS}/affine"][:], dtype=np.float64)
            self.flip = np.asarray(group[f"{_VIEWS}/flip"][:], dtype=bool)
            self.jitter = np.asarray(group[f"{_VIEWS}/jitter"][:], dtype=np.float32)
        except KeyError as exc:
            raise StoreError(f"view store lacks its transform array {exc}", where=str(store.path), fix="delete the folder; the next D-ULD run re-extracts it") from None
        self.n_views = int(store.attrs["n_views"])
        self.main_config_hash = str(store.attrs["main_config_hash"])
        n = len(store)
        if not (len(self.source_rows) == len(self.views) == len(self.flip) == len(self.jitter) == n) or self.affine.shape != (n, 2, 3):
            raise StoreError("view store arrays disagree in length", where=str(store.path), fix="delete the folder; the next D-ULD run re-extracts it")
        # Row i*M + v is view v of the i-th source row (the layout create() writes).
        self._first = {int(r): i for i, r in enumerate(self.source_rows[:: self.n_views])}

    @property
    def path(self) -> Path:
        return self.store.path

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        main: FeatureStore,
        source_rows: np.ndarray,
        n_views: int,
        affine: np.ndarray,
        flip: np.ndarray,
        jitter: np.ndarray,
        config: dict,
        config_hash: str,
        shard_size: int,
        extra_attrs: dict | None = None,
    ) -> "ViewStore":
        """Create an empty view store for ``source_rows`` of ``main`` (M rows each), atomically.

        Keys, shapes, crop size and channel projections are the main store's, so
        the heads read both stores alike. ``affine`` / ``flip`` / ``jitter``
        hold one entry per view row (row ``i * n_views + v``).
        """
        import zarr

        path = Path(path)
        src = np.asarray(source_rows, dtype=np.int64).reshape(-1)
        n = len(src) * int(n_views)
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (n, 2, 3) or len(flip) != n or np.asarray(jitter).shape != (n, 3):
            raise StoreError(f"need one transform per view row ({n}), got affine {affine.shape}", where=str(path))
        if path.exists():
            raise StoreError("view store already exists", where=str(path), fix="open it with ViewStore.open, or delete the folder to rebuild it")
        rows = np.repeat(src, int(n_views))
        projections = {layer: p for layer in {k.rsplit("@t", 1)[0] for k in main.keys} if (p := main.projection(layer)) is not None}
        tmp = path.parent / f".{path.name}.views-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            FeatureStore.create(
                tmp,
                config=config,
                config_hash=config_hash,
                image_ids=main.image_ids[rows],
                splits=main.splits[rows],
                crop_boxes=main.crop_boxes[rows],
                shapes=dict(main.shapes),
                image_size=main.image_size,
                shard_size=shard_size,
                projections=projections,
                extra_attrs={"kind": KIND, "n_views": int(n_views), "main_config_hash": main.config_hash, "main_store": str(main.path), **(extra_attrs or {})},
            )
            group = zarr.open_group(str(tmp), mode="r+", zarr_format=3)
            for name, arr, dtype in (
                ("source_row", rows, "int64"),
                ("view", np.tile(np.arange(int(n_views)), len(src)), "int32"),
                ("affine", affine, "float64"),
                ("flip", np.asarray(flip, bool), "bool"),
                ("jitter", np.asarray(jitter, np.float32), "float32"),
            ):
                a = np.asarray(arr).astype(dtype)
                group.create_array(f"{_VIEWS}/{name}", shape=a.shape, chunks=a.shape, dtype=dtype)[...] = a
            try:
                os.rename(tmp, path)
            except OSError:
                if path.exists():
                    raise StoreError("view store was created by another process at the same time", where=str(path), fix="re-run: the existing store is resumed") from None
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, require_complete=False, writable=True)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True, expected_hash: str | None = None, writable: bool = False) -> "ViewStore":
        return cls(FeatureStore.open(path, require_complete=require_complete, expected_hash=expected_hash, writable=writable))

    def rows_for(self, source_rows: Any, views: Any) -> np.ndarray:
        """View-store rows of (main-store row, view index) pairs."""
        src = np.asarray(source_rows, dtype=np.int64).reshape(-1)
        v = np.asarray(views, dtype=np.int64).reshape(-1)
        missing = [int(r) for r in src if int(r) not in self._first]
        if missing:
            raise StoreError(
                f"no augmented views of main-store rows {missing[:5]}",
                where=str(self.path),
                fix="views exist for the training split only; pair training rows with their views",
            )
        if len(v) and (v.min() < 0 or v.max() >= self.n_views):
            raise StoreError(f"view index out of range (store has {self.n_views} per image)", where=str(self.path))
        return np.asarray([self._first[int(r)] * self.n_views for r in src], np.int64) + v


def attach_views(batches: Iterator[dict], views: ViewStore, seed: int) -> Iterator[dict]:
    """Add one augmented view per crop to every batch of main-store training rows.

    For each image the view index is drawn from a generator seeded by
    ``seed`` (batches in the same order give the same views, so a re-run or
    resumed stage sees the same pairs). Adds ``view_features`` (the views'
    maps, float32, same keys), ``view_affine`` ((B, 2, 3) float32 in
    *normalised* coordinates, crop -> view, what the heads' correspondence
    code uses) and ``view_flip`` ((B,) bool).
    """
    import torch

    from pipeline.datasets.augment_views import pixel_to_normalised_affine

    rng = np.random.default_rng([int(seed), 0x5EED])
    size = views.store.image_size
    for batch in batches:
        src = batch["index"].numpy()
        rows = views.rows_for(src, rng.integers(0, views.n_views, size=len(src)))
        feats = views.store.read_indices(rows)
        yield {
            **batch,
            "view_features": {k: torch.from_numpy(v.astype(np.float32)) for k, v in feats.items()},
            "view_affine": torch.from_numpy(pixel_to_normalised_affine(views.affine[rows], size).astype(np.float32)),
            "view_flip": torch.from_numpy(views.flip[rows].copy()),
        }

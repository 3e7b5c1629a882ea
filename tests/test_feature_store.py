"""The Zarr v3 feature store and its readers: round trip, shards, resume markers, errors, dask, torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.errors import StoreError
from storage.feature_loader import BlockShuffleSampler, FeatureDataset, make_loader
from storage.features import FeatureStore, random_projection

torch.set_num_threads(1)

SHAPES = {"up0.res1@t50": (6, 2, 2), "up1.res1@t50": (3, 4, 4), "up1.res1@t150": (3, 4, 4)}
N, SHARD = 11, 4  # 3 shards, the last one partial


def _features(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal((n, *s)) * 3).astype(np.float32) for k, s in SHAPES.items()}


def _create(path, shapes=SHAPES, **kw) -> FeatureStore:
    ids = [f"img_{i:03d}" for i in range(N)]
    splits = ["train"] * 8 + ["test"] * 3
    boxes = np.arange(N * 4, dtype=np.float32).reshape(N, 4)
    return FeatureStore.create(
        path,
        config={"dataset": "toy", "backbone": {"kind": "test"}, "spec": {"image_size": 16}},
        config_hash="abc123",
        image_ids=ids,
        splits=splits,
        crop_boxes=boxes,
        shapes=shapes,
        image_size=16,
        shard_size=SHARD,
        **kw,
    )


def _fill(store: FeatureStore, feats: dict[str, np.ndarray], shards=None) -> None:
    for i in range(store.n_shards()) if shards is None else shards:
        a, b = store.shard_range(i)
        store.write_shard(i, {k: v[a:b] for k, v in feats.items()})


def test_round_trip_values_dtypes_ids(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    _fill(store, feats)
    st = FeatureStore.open(tmp_path / "s", expected_hash="abc123")
    assert len(st) == N and st.is_complete() and st.missing_shards() == []
    assert st.keys == sorted(SHAPES) and st.shapes == SHAPES
    assert list(st.image_ids) == [f"img_{i:03d}" for i in range(N)]
    assert st.image_ids.dtype.kind == "U" and st.splits.dtype.kind == "U"
    assert np.array_equal(st.crop_boxes, np.arange(N * 4, dtype=np.float32).reshape(N, 4))
    assert st.image_size == 16 and st.shard_size == SHARD
    assert st.attrs["versions"]["zarr"].startswith("3.")
    assert set(st.attrs["versions"]) == {"torch", "diffusers", "zarr", "numpy"}
    assert st.backbone == {"kind": "test"}
    out = st.read(0, N)
    for k in SHAPES:
        assert out[k].dtype == np.float16
        # Stored exactly as the float16 cast of what was written.
        assert np.array_equal(out[k], feats[k].astype(np.float16))
    np.testing.assert_array_equal(st.indices("train"), np.arange(8))
    np.testing.assert_array_equal(st.indices("test"), np.arange(8, 11))
    with pytest.raises(StoreError, match="no images in split"):
        st.indices("val")


def test_on_disk_layout_is_zarr_v3_sharded(tmp_path):
    store = _create(tmp_path / "s")
    _fill(store, _features())
    import zarr

    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    arr = g["features/up1.res1@t50"]
    assert arr.metadata.zarr_format == 3
    assert arr.chunks == (1, 3, 4, 4) and arr.shards == (SHARD, 3, 4, 4)
    meta = json.loads((tmp_path / "s" / "features" / "up1.res1@t50" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    # Every image chunk is checksummed (no compression by default: float16 activations barely compress).
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]] == ["bytes", "crc32c"]
    # One shard file per (key, shard): 3 shards -> 3 files.
    files = [p for p in (tmp_path / "s" / "features" / "up1.res1@t50" / "c").rglob("*") if p.is_file()]
    assert len(files) == 3
    assert g["complete"].chunks == (1,)


def test_shard_alignment_and_shape_checks(tmp_path):
    store = _create(tmp_path / "s")
    assert store.n_shards() == 3
    assert [store.shard_range(i) for i in range(3)] == [(0, 4), (4, 8), (8, 11)]
    with pytest.raises(StoreError, match="out of range"):
        store.shard_range(3)
    feats = _features()
    # A block that is not exactly the shard is refused (no partial shard writes).
    with pytest.raises(StoreError, match="expected"):
        store.write_shard(0, {k: v[0:3] for k, v in feats.items()})
    with pytest.raises(StoreError, match="keys"):
        store.write_shard(0, {"up0.res1@t50": feats["up0.res1@t50"][:4]})
    bad = {k: v[:4].copy() for k, v in feats.items()}
    bad["up0.res1@t50"][0, 0, 0, 0] = 1e6  # overflows float16
    with pytest.raises(StoreError, match="overflow float16"):
        store.write_shard(0, bad)
    assert store.missing_shards() == [0, 1, 2]
    with pytest.raises(StoreError, match="already exists"):
        _create(tmp_path / "s")


def test_incomplete_store_error_and_resume_markers(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    _fill(store, feats, shards=[0, 2])  # a "crash" before shard 1
    with pytest.raises(StoreError, match="incomplete") as err:
        FeatureStore.open(tmp_path / "s")
    assert "re-running the same `uld features`" in err.value.fix
    st = FeatureStore.open(tmp_path / "s", require_complete=False, writable=True)
    assert st.missing_shards() == [1] and not st.is_complete()
    # Completed shards are readable; a range touching the missing shard is not.
    assert np.array_equal(st.read(0, 4)["up0.res1@t50"], feats["up0.res1@t50"][:4].astype(np.float16))
    with pytest.raises(StoreError, match="unfinished shards \\[1\\]"):
        st.read(2, 6)
    with pytest.raises(StoreError, match="unfinished"):
        st.read_indices([9, 5])
    with pytest.raises(StoreError, match="incomplete"):
        st.to_dask("up0.res1@t50")
    _fill(st, feats, shards=st.missing_shards())
    done = FeatureStore.open(tmp_path / "s")
    fresh = _create(tmp_path / "t")
    _fill(fresh, feats)
    for k in SHAPES:
        assert np.array_equal(done.read(0, N)[k], FeatureStore.open(tmp_path / "t").read(0, N)[k])


def test_half_written_shard_is_not_complete(tmp_path):
    """Data of some keys on disk but no marker (crash mid-shard) -> the shard is still missing."""
    feats = _features()
    store = _create(tmp_path / "s")
    key = store.keys[0]
    store._arrays[key][0:4] = feats[key][0:4].astype(np.float16)  # what a crash after one key leaves
    assert FeatureStore.open(tmp_path / "s", require_complete=False).missing_shards() == [0, 1, 2]


def test_hash_mismatch_missing_store_and_not_a_store(tmp_path):
    _create(tmp_path / "s")
    with pytest.raises(StoreError, match="does not match") as err:
        FeatureStore.open(tmp_path / "s", require_complete=False, expected_hash="other")
    assert err.value.where == str(tmp_path / "s")
    with pytest.raises(StoreError, match="not found") as err:
        FeatureStore.open(tmp_path / "nothing")
    assert "uld features" in err.value.fix
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(StoreError, match="not a ULD feature store"):
        FeatureStore.open(tmp_path / "plain")
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(tmp_path / "s", require_complete=False).write_shard(0, {})


def test_read_indices_any_order_with_repeats(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    _fill(store, feats)
    idx = np.array([10, 0, 3, 4, 4, 9, 1])
    out = store.read_indices(idx, keys=["up1.res1@t150"])
    assert list(out) == ["up1.res1@t150"]
    assert np.array_equal(out["up1.res1@t150"], feats["up1.res1@t150"][idx].astype(np.float16))
    assert store.read_indices(np.array([], dtype=int))["up0.res1@t50"].shape == (0, 6, 2, 2)
    with pytest.raises(StoreError, match="not in the store"):
        store.read(0, 2, keys=["nope@t1"])
    with pytest.raises(StoreError, match="out of range"):
        store.read_indices([11])


def test_dask_reader_shapes_and_chunking(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    _fill(store, feats)
    d = store.to_dask("up1.res1@t50")
    assert d.shape == (N, 3, 4, 4) and d.dtype == np.float16
    assert d.chunks == ((4, 4, 3), (3,), (4,), (4,))  # one dask chunk per shard
    mean = d.astype(np.float32).mean(axis=(0, 2, 3)).compute(scheduler="synchronous")
    np.testing.assert_allclose(mean, feats["up1.res1@t50"].astype(np.float16).astype(np.float32).mean(axis=(0, 2, 3)), rtol=1e-5)


def test_torch_loader_batches_and_block_shuffle(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    _fill(store, feats)
    idx = store.indices("train")
    loader = make_loader(store, idx, batch_size=3, shuffle=False)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [3, 3, 2]
    got = torch.cat([b["index"] for b in batches]).numpy()
    assert np.array_equal(got, idx)
    b0 = batches[0]
    assert b0["features"]["up1.res1@t50"].shape == (3, 3, 4, 4) and b0["features"]["up1.res1@t50"].dtype == torch.float32
    np.testing.assert_array_equal(b0["features"]["up0.res1@t50"].numpy(), feats["up0.res1@t50"][:3].astype(np.float16).astype(np.float32))

    # Shuffled: a permutation, the same for the same seed and epoch, different across epochs,
    # and images of one cache block stay together (each block decoded once per epoch).
    sl = make_loader(store, idx, batch_size=4, shuffle=True, seed=7, block=2)
    e0 = torch.cat([b["index"] for b in sl]).numpy()
    e1 = torch.cat([b["index"] for b in sl]).numpy()
    assert sorted(e0) == list(idx) and sorted(e1) == list(idx)
    sl2 = make_loader(store, idx, batch_size=4, shuffle=True, seed=7, block=2)
    assert np.array_equal(torch.cat([b["index"] for b in sl2]).numpy(), e0)
    assert not np.array_equal(e0, e1)
    blocks = e0 // 2
    assert all(len(set(blocks[i : i + 2])) == 1 for i in range(0, len(blocks), 2))

    # Per-item access and the worker path (the dataset pickles only the path).
    ds = FeatureDataset(tmp_path / "s", [10, 2], keys=["up0.res1@t50"])
    item = ds[0]
    assert item["index"] == 10 and list(item["features"]) == ["up0.res1@t50"]
    assert len(BlockShuffleSampler(ds)) == 2
    wl = make_loader(tmp_path / "s", None, batch_size=6, num_workers=1, prefetch=1)
    assert np.array_equal(torch.cat([b["index"] for b in wl]).numpy(), np.arange(N))


def test_channel_projection_is_stored_and_applied(tmp_path):
    proj = random_projection(6, 2, seed=3, layer="up0.res1")
    assert proj.shape == (2, 6) and np.array_equal(proj, random_projection(6, 2, seed=3, layer="up0.res1"))
    assert not np.array_equal(proj, random_projection(6, 2, seed=3, layer="up1.res1"))
    shapes = dict(SHAPES, **{"up0.res1@t50": (2, 2, 2)})
    store = _create(tmp_path / "s", shapes=shapes, projections={"up0.res1": proj})
    feats = _features()  # raw: 6 channels for up0.res1
    _fill(store, feats)
    st = FeatureStore.open(tmp_path / "s")
    assert np.array_equal(st.projection("up0.res1"), proj) and st.projection("up1.res1") is None
    want = np.einsum("oc,nchw->nohw", proj, feats["up0.res1@t50"]).astype(np.float16)
    assert np.array_equal(st.read(0, N)["up0.res1@t50"], want)
    assert st.attrs["projection"] == {"up0.res1": {"in": 6, "out": 2}}
    with pytest.raises(StoreError, match="reduce_channels"):
        random_projection(4, 4, seed=0, layer="x")


def test_zstd_option_and_corruption_is_detected(tmp_path):
    feats = _features()
    store = _create(tmp_path / "z", compression="zstd")
    _fill(store, feats)
    st = FeatureStore.open(tmp_path / "z")
    assert st.attrs["compression"] == "zstd"
    assert np.array_equal(st.read(0, N)["up1.res1@t50"], feats["up1.res1@t50"].astype(np.float16))
    with pytest.raises(StoreError, match="unknown compression"):
        _create(tmp_path / "bad", compression="lz4")

    plain = _create(tmp_path / "s")
    _fill(plain, feats)
    shard_file = tmp_path / "s" / "features" / "up0.res1@t50" / "c" / "0" / "0" / "0" / "0"  # shard 0
    raw = bytearray(shard_file.read_bytes())
    raw[5] ^= 0xFF  # flip bits inside the first image's chunk
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="cannot be decoded") as err:
        FeatureStore.open(tmp_path / "s").read(0, 4)
    assert "delete the folder" in err.value.fix


def _shard_file(root, key: str, shard: int):
    return root / "features" / key / "c" / str(shard) / "0" / "0" / "0"


def test_deleted_shard_file_is_named_not_read_as_zeros_and_rewrite_repairs(tmp_path):
    feats = _features()
    _fill(_create(tmp_path / "s"), feats)
    victim = _shard_file(tmp_path / "s", "up1.res1@t50", 1)
    original = victim.read_bytes()
    assert FeatureStore.open(tmp_path / "s").verify() == []
    victim.unlink()

    # Opening for reading names the array, the image range and the file, and says what to run.
    with pytest.raises(StoreError, match="damaged") as err:
        FeatureStore.open(tmp_path / "s")
    assert "features/up1.res1@t50 images 4:8 (shard 1)" in str(err.value) and str(victim) in str(err.value)
    assert "uld features" in err.value.fix
    st = FeatureStore.open(tmp_path / "s", require_complete=False)
    problems = st.verify()
    assert [(p.array, p.start, p.stop, p.shard) for p in problems] == [("features/up1.res1@t50", 4, 8, 1)]
    assert problems[0].problem == "shard file missing" and problems[0].path == str(victim)
    # The marker is still set, yet the shard counts as missing, and a direct read refuses.
    assert st.unfinished_shards() == [] and st.missing_shards() == [1] and not st.is_complete()
    with pytest.raises(StoreError, match="missing on disk"):
        st.read(0, N, keys=["up1.res1@t50"])
    assert st.read(0, N, keys=["up0.res1@t50"])["up0.res1@t50"].shape[0] == N  # other keys still read

    # Rewriting the missing shards (what `uld features` does) restores the same bytes.
    w = FeatureStore.open(tmp_path / "s", require_complete=False, writable=True)
    _fill(w, feats, shards=w.missing_shards())
    assert victim.read_bytes() == original
    assert FeatureStore.open(tmp_path / "s").verify() == []


def test_verify_finds_truncated_shards_lost_flags_and_unfinished_shards(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    _fill(store, feats, shards=[0, 1])
    st = FeatureStore.open(tmp_path / "s", require_complete=False)
    assert [(p.array, p.shard) for p in st.verify()] == [("complete", 2)]  # never written

    # Truncation: the shard index at the end of the file is gone.
    f0 = _shard_file(tmp_path / "s", "up0.res1@t50", 0)
    f0.write_bytes(f0.read_bytes()[:-10])
    # A lost validity chunk would silently turn the images of shard 1 into "skipped".
    (tmp_path / "s" / "valid" / "c" / "1").unlink()
    st = FeatureStore.open(tmp_path / "s", require_complete=False)
    got = {(p.array, p.shard): p.problem for p in st.verify()}
    assert got[("features/up0.res1@t50", 0)] == "shard index checksum mismatch"
    assert "validity flags missing" in got[("valid", 1)]
    assert st.missing_shards() == [0, 1, 2]

    # A whole-store array cannot be re-extracted: the fix is a rebuild.
    (tmp_path / "s" / "crop_box" / "c" / "0" / "0").unlink()
    _fill(FeatureStore.open(tmp_path / "s", require_complete=False, writable=True), feats)
    with pytest.raises(StoreError, match="crop_box") as err:
        FeatureStore.open(tmp_path / "s")
    assert "delete the folder" in err.value.fix


def test_deep_verify_decodes_every_chunk(tmp_path):
    feats = _features()
    _fill(_create(tmp_path / "s"), feats)
    f = _shard_file(tmp_path / "s", "up1.res1@t150", 2)
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0xFF  # inside the first chunk's data: the index is intact
    f.write_bytes(bytes(raw))
    st = FeatureStore.open(tmp_path / "s")  # the cheap check cannot see a flipped data bit
    assert st.verify() == []
    deep = st.verify(deep=True)
    assert [(p.array, p.shard) for p in deep] == [("features/up1.res1@t150", 2)] and "cannot be decoded" in deep[0].problem
    assert st.missing_shards() == [2]  # what the deep check found is now due for re-extraction
    w = FeatureStore.open(tmp_path / "s", require_complete=False, writable=True)
    w.verify(deep=True)
    _fill(w, feats, shards=w.missing_shards())
    assert FeatureStore.open(tmp_path / "s").verify(deep=True) == []


def test_shard_of_skipped_images_only_is_not_a_problem(tmp_path):
    feats = _features()
    store = _create(tmp_path / "s")
    store.record_skipped({f"img_{i:03d}": "unreadable" for i in range(4)})
    zero = {k: np.zeros_like(v[:4]) for k, v in feats.items()}
    store.write_shard(0, zero, valid=np.zeros(4, bool))  # zarr stores no file for an all-fill shard
    _fill(store, feats, shards=[1, 2])
    st = FeatureStore.open(tmp_path / "s")
    assert st.verify() == [] and not st.valid[:4].any() and st.valid[4:].all()

"""Direct shard reads give exactly Zarr's values, check every CRC32C, and keep per-image access."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.errors import StoreError
from storage.features import FeatureStore
from storage.shard_reader import layout_of, read_rows

N, SHARD = 11, 4  # 3 shards, the last one partial
SHAPES = {"a@t0": (3, 4, 4), "b@t0": (2, 8, 8)}


def _store(path, compression="none"):
    rng = np.random.default_rng(0)
    data = {k: rng.standard_normal((N, *s)).astype(np.float16) for k, s in SHAPES.items()}
    st = FeatureStore.create(path, config={}, config_hash="h", image_ids=[f"i{i}" for i in range(N)], splits=["train"] * N,
                             crop_boxes=np.ones((N, 4)), shapes=SHAPES, image_size=8, shard_size=SHARD, compression=compression)
    for s in range(st.n_shards()):
        a, b = st.shard_range(s)
        st.write_shard(s, {k: v[a:b] for k, v in data.items()})
    return FeatureStore.open(path), data


def test_every_range_and_index_list_equals_zarr(tmp_path):
    st, data = _store(tmp_path / "s")
    assert all(st._direct[k] is not None for k in SHAPES)
    for a in range(N):
        for b in range(a, N + 1):
            got = st.read(a, b)
            for k in SHAPES:
                assert np.array_equal(got[k], data[k][a:b]) and np.array_equal(got[k], np.asarray(st._arrays[k][a:b]))
    idx = np.random.default_rng(1).integers(0, N, 30)
    assert np.array_equal(st.read_indices(idx)["b@t0"], data["b@t0"][idx])


def test_compressed_stores_keep_the_zarr_path(tmp_path):
    st, data = _store(tmp_path / "z", compression="zstd")
    assert all(st._direct[k] is None for k in SHAPES)
    assert np.array_equal(st.read(0, N)["a@t0"], data["a@t0"])


def test_absent_chunks_read_as_the_fill_value(tmp_path):
    # Zarr's default leaves all-zero chunks out of a shard; the reader must give zeros like Zarr.
    arr = zarr.create_array(str(tmp_path / "arr"), shape=(6, 2, 2, 2), chunks=(1, 2, 2, 2), shards=(6, 2, 2, 2), dtype="float16",
                            compressors=zarr.codecs.Crc32cCodec(), fill_value=0.0)
    x = np.arange(48, dtype=np.float16).reshape(6, 2, 2, 2) + 1
    x[2] = 0
    arr[:] = x
    layout = layout_of(arr)
    got = read_rows(tmp_path / "arr" / "c" / "0" / "0" / "0" / "0", layout, 1, 5)
    assert np.array_equal(got, x[1:5]) and np.array_equal(got, np.asarray(arr[1:5]))


@pytest.mark.parametrize("where", ["chunk", "index", "truncate"])
def test_damage_is_a_store_error(tmp_path, where):
    st, _ = _store(tmp_path / "s")
    f = tmp_path / "s" / "features" / "b@t0" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    if where == "chunk":
        raw[2 * (2 * 8 * 8 * 2 + 4) + 7] ^= 0x01  # one bit of image 2 of the shard (row 6)
    elif where == "index":
        raw[-10] ^= 0x01
    else:
        raw = raw[: len(raw) // 2]
    f.write_bytes(bytes(raw))
    st = FeatureStore.open(tmp_path / "s", require_complete=False)
    assert np.array_equal(st.read(0, 4)["b@t0"], st.read(0, 4)["b@t0"])  # other shards still read
    with pytest.raises(StoreError, match="cannot be decoded"):
        st.read(4, 8, ["b@t0"])
    if where == "chunk":  # the neighbours of the damaged image still read one by one
        st.read(5, 6, ["b@t0"])
        with pytest.raises(StoreError, match="checksum mismatch"):
            st.read(6, 7, ["b@t0"])

"""Feature stores on S3, against a real S3-compatible server (moto's server mode).

No mocks: the store, the shard-direct ranged reads, the lock object and the
`uld features --store-url` command all talk HTTP to a local moto server
(``moto.server.ThreadedMotoServer``, on a free port of 127.0.0.1) that this
module starts and stops; the CLI test's subprocess reaches it over the same
port. Skipped (with the reason) when moto's server extra or s3fs is missing:
``pip install -e '.[dev]'`` installs both.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("flask") is None,
    reason="needs moto[server] and s3fs (pip install -e '.[dev]'): the S3 tests run against a local moto server",
)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "uld-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port, one bucket, and the AWS_* environment pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"url": url, "env": env, "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(s3, prefix: str) -> list[str]:
    out = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def _make(location, x: np.ndarray, shard_size: int = 4):
    from storage.features import FeatureStore

    n = len(x)
    store = FeatureStore.create(
        location, config={"dataset": "toy"}, config_hash="abc123", image_ids=[f"im{i}" for i in range(n)],
        splits=["train"] * (n - 3) + ["test"] * 3, crop_boxes=np.arange(4 * n, dtype=np.float32).reshape(n, 4) + 1,
        shapes={"up0@t10": x.shape[1:]}, image_size=16, shard_size=shard_size,
    )
    for i in range(store.n_shards()):
        a, b = store.shard_range(i)
        valid = np.ones(b - a, bool)
        if i == 1:
            valid[1] = False  # a skipped image: its chunk is absent, reads give zeros
        store.write_shard(i, {"up0@t10": np.where(valid[:, None, None, None], x[a:b], 0)}, valid=valid)
    return store


def test_store_on_s3_reads_back_bit_identical_to_the_local_store(s3, tmp_path):
    from pipeline.errors import StoreError
    from storage.features import FeatureStore

    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float16)
    url = f"s3://{BUCKET}/api/store"
    _make(tmp_path / "store", x)
    _make(url, x)
    # The root zarr.json (what makes a store exist) is there with every other object.
    assert f"api/store/zarr.json" in _keys(s3, "api/store/")
    assert FeatureStore.exists(url) and not FeatureStore.exists(f"s3://{BUCKET}/api/other")

    local, remote = FeatureStore.open(tmp_path / "store"), FeatureStore.open(url)
    assert remote.path == url and remote.is_complete() and remote.verify(deep=True) == []
    assert np.array_equal(remote.image_ids, local.image_ids) and np.array_equal(remote.valid, local.valid)
    assert np.array_equal(remote.crop_boxes, local.crop_boxes)
    got, want = remote.read(0, 10)["up0@t10"], local.read(0, 10)["up0@t10"]
    assert got.tobytes() == want.tobytes() and not got[5].any() and got[4].any()
    idx = [9, 0, 5, 5, 2]
    assert remote.read_indices(idx)["up0@t10"].tobytes() == local.read_indices(idx)["up0@t10"].tobytes()
    remote.set_direct_reads(False)  # Zarr's own FsspecStore path gives the same bytes
    assert remote.read(0, 10)["up0@t10"].tobytes() == want.tobytes()
    assert remote.bytes_per_image() == local.bytes_per_image()
    # The torch loader given the URL: a spawned worker process opens the store on S3 itself.
    from storage.feature_loader import make_loader

    for workers in (0, 1):
        batches = list(make_loader(url, [0, 2, 4, 6, 8], batch_size=2, num_workers=workers))
        got_rows = np.concatenate([b["features"]["up0@t10"].numpy() for b in batches])
        assert [int(i) for b in batches for i in b["index"]] == [0, 2, 4, 6, 8]
        assert np.array_equal(got_rows, want[[0, 2, 4, 6, 8]].astype(np.float32))
    # The shard files are byte for byte the local ones.
    rel = "features/up0@t10/c/0/0/0/0"
    body = s3["client"].get_object(Bucket=BUCKET, Key=f"api/store/{rel}")["Body"].read()
    assert body == (tmp_path / "store" / rel).read_bytes()

    # A shard object deleted after writing: opening refuses it, naming the object; rewriting repairs it.
    s3["client"].delete_object(Bucket=BUCKET, Key=f"api/store/{rel}")
    with pytest.raises(StoreError, match=r"shard 0.*shard file missing") as err:
        FeatureStore.open(url)
    assert f"{url}/{rel}" in str(err.value)
    store = FeatureStore.open(url, require_complete=False, writable=True)
    assert store.missing_shards() == [0]
    store.write_shard(0, {"up0@t10": x[0:4]})
    assert FeatureStore.open(url).read(0, 10)["up0@t10"].tobytes() == want.tobytes()
    with pytest.raises(StoreError, match="already exists"):
        _make(url, x)


def test_lock_object_excludes_a_second_writer_and_expires(s3, monkeypatch):
    from pipeline.errors import BusyError
    from storage.locks import ObjectLock, writer_lock

    target = f"s3://{BUCKET}/locks/store"
    first = writer_lock(target, "feature store")
    assert isinstance(first, ObjectLock)
    with first:
        assert _keys(s3, "locks/") == ["locks/.store.lock"]
        owner = first.read_owner()
        assert owner["pid"] == os.getpid() and owner["expires_at"] > time.time()
        with pytest.raises(BusyError, match=rf"pid {os.getpid()}"):
            ObjectLock(target).acquire()
    assert _keys(s3, "locks/") == []  # released: the object is gone
    # A holder that died: its lock object stays until it expires, then the next writer takes it over.
    stale = ObjectLock(target, ttl_s=1.0)
    stale._files.write(stale.lock_name, stale._record())
    with pytest.raises(BusyError):
        ObjectLock(target).acquire()
    time.sleep(1.2)
    with ObjectLock(target, ttl_s=3.0) as taker:
        assert taker.read_owner()["token"] == taker.token
        before = taker.read_owner()["expires_at"]
        time.sleep(1.6)  # renewed every ttl / 3
        assert taker.read_owner()["expires_at"] > before and not taker.lost
    assert _keys(s3, "locks/") == []


def test_uld_features_store_url_matches_the_local_store_and_resumes(prefect_harness, s3, tmp_path):
    from flows.features import extract_features
    from storage.features import FeatureStore
    from pipeline.errors import BusyError
    from storage.locks import writer_lock
    from tests.test_features_noop import SPEC, _toy
    from tests.tiny_runs import make_backbone

    home = tmp_path / "ws"
    _toy(home, tmp_path / "images")
    bb = make_backbone(tmp_path / "bb", seed=0)
    root = f"s3://{BUCKET}/flow"
    local = extract_features("toy", bb, SPEC, home=home, shard_size=4)
    remote = extract_features("toy", bb, SPEC, home=home, shard_size=4, store_url=root)
    assert isinstance(remote, str) and remote == f"{root}/toy/{Path(bb).name}.zarr/{local.name}"  # same layout, same hash
    a, b = FeatureStore.open(local), FeatureStore.open(remote)
    assert a.keys == b.keys and np.array_equal(a.image_ids, b.image_ids) and a.config == b.config
    for k in a.keys:
        assert a.read(0, len(a), [k])[k].tobytes() == b.read(0, len(b), [k])[k].tobytes()
    # The lock object (.<hash>.lock beside the store) is removed after the run; only the store is left.
    lock_key = remote.split(f"{BUCKET}/", 1)[1].rsplit("/", 1)[0] + f"/.{local.name}.lock"
    prefix = lock_key.rsplit("/", 1)[0] + "/"
    assert all(not k.endswith(".lock") for k in _keys(s3, prefix)) and _keys(s3, prefix)

    def uld(*args: str, url: str = root, **env_over: str) -> subprocess.CompletedProcess:
        argv = ["--home", str(home), "features", "-d", "toy", "-b", bb, "--size", "32", "--timesteps", "10", "--crop-margin", "0.1",
                "--shard-size", "4", "--store-url", url, *args]
        code = f"import sys\nfrom flows.cli import main\nsys.argv = ['uld', *{argv!r}]\nmain()\n"
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "p"), **s3["env"], **env_over}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)

    out = uld()
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout and remote in out.stdout
    out = uld("--verify")
    assert out.returncode == 0 and "verified:   complete" in out.stdout, out.stdout + out.stderr

    # A shard object lost on S3: --verify names it (exit 2).
    key = next(k for k in _keys(s3, remote.split(f"{BUCKET}/", 1)[1] + "/features/") if k.endswith("/c/1/0/0/0"))
    s3["client"].delete_object(Bucket=BUCKET, Key=key)
    out = uld("--verify")
    assert out.returncode == 2 and "shard file missing" in out.stdout and key in out.stdout, out.stdout + out.stderr
    # While another writer holds the store's lock object, the repair is refused (in process: the lock is the
    # object on S3, not this process, and a CLI run would cost another Prefect server start) ...
    with writer_lock(remote, "feature store"):
        with pytest.raises(BusyError, match="another uld process is writing"):
            extract_features("toy", bb, SPEC, home=home, shard_size=4, store_url=root)
    # ... and once it is released, the same command re-extracts the lost shard bit-identically.
    out = uld()
    assert out.returncode == 0 and "nothing to do" not in out.stdout, out.stdout + out.stderr
    b = FeatureStore.open(remote)
    for k in a.keys:
        assert a.read(0, len(a), [k])[k].tobytes() == b.read(0, len(b), [k])[k].tobytes()
    assert b.config == a.config

    # Bad locations are one clean message each (exit 2, no traceback): a missing bucket, an endpoint nobody
    # listens on, an unknown protocol.
    out = uld(url="s3://no-such-bucket-uld/features")
    assert out.returncode == 2 and "bucket s3://no-such-bucket-uld does not exist" in out.stderr and "Traceback" not in out.stderr, out.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: connections are refused
        out = uld(AWS_ENDPOINT_URL=dead, AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    assert out.returncode == 2 and f"cannot reach s3://{BUCKET}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = uld(url="nosuchproto://x/y")
    assert out.returncode == 2 and "not a usable store URL" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_locations_are_clean_store_errors(s3):
    from pipeline.errors import StoreError
    from storage.features import FeatureStore
    from storage.locks import writer_lock

    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open("s3://no-such-bucket-uld/a/b")
    with pytest.raises(StoreError, match="names a bucket, not a folder"):
        writer_lock(f"s3://{BUCKET}", "feature store")
    with pytest.raises(StoreError, match="not a usable store URL"):
        FeatureStore.exists("nosuchproto://x/y")
    with pytest.raises(StoreError, match="feature store not found"):
        FeatureStore.open(f"s3://{BUCKET}/nothing/here")


# ------------------------------------------------------------------ run folders at a URL (--runs-url)
def _run_folder(path: Path) -> Path:
    (path / "checkpoints" / "round-001").mkdir(parents=True)
    (path / "config.json").write_text('{"run_id": "r"}\n')
    (path / "metrics.parquet").write_bytes(b"m" * 1000)
    (path / "checkpoints" / "round-001" / "model.safetensors").write_bytes(b"w" * 5000)
    (path / ".metrics.parquet.abc.tmp").write_bytes(b"half-written")  # an atomic write in progress: never copied
    return path


def test_run_mirror_copies_what_changed_and_pull_checks_every_file(s3, tmp_path):
    import hashlib

    from storage.run_mirror import INDEX_NAME, RunMirror

    run = _run_folder(tmp_path / "runs" / "r")
    mirror = RunMirror.for_run(f"s3://{BUCKET}/mirror", run)
    assert not mirror.exists()
    first = mirror.push()
    assert (first.files, first.transferred, first.bytes) == (3, 3, 6016)
    names = sorted(k.split("mirror/r/", 1)[1] for k in _keys(s3, "mirror/r/"))
    blobs = sorted("blobs/" + hashlib.sha256(b).hexdigest() for b in (b'{"run_id": "r"}\n', b"m" * 1000, b"w" * 5000))
    # blobs by content, the index, and the readable view of the results (not of the weights)
    assert names == sorted([*blobs, INDEX_NAME, "config.json", "metrics.parquet"])
    # Only what changed is uploaded again; blobs no snapshot refers to are deleted after the new index.
    (run / "metrics.parquet").write_bytes(b"n" * 1200)
    (run / "checkpoints" / "round-001" / "model.safetensors").unlink()
    second = mirror.push()
    assert (second.files, second.transferred, second.removed) == (2, 1, 2)
    assert s3["client"].get_object(Bucket=BUCKET, Key="mirror/r/metrics.parquet")["Body"].read() == b"n" * 1200
    # Pull into an empty folder on "another machine": the same bytes.
    other = RunMirror.for_run(f"s3://{BUCKET}/mirror", tmp_path / "elsewhere" / "r")
    got = other.pull()
    assert got.transferred == 2 and (tmp_path / "elsewhere" / "r" / "metrics.parquet").read_bytes() == b"n" * 1200


def test_an_interrupted_push_leaves_the_last_snapshot_and_stale_folders_cannot_overwrite(s3, tmp_path, monkeypatch):
    from pipeline.errors import StoreError
    from storage import locations
    from storage.run_mirror import INDEX_NAME, RunMirror

    url = f"s3://{BUCKET}/mirror2"
    run = _run_folder(tmp_path / "a" / "r")
    RunMirror.for_run(url, run).push()
    (run / "metrics.parquet").write_bytes(b"round 2 metrics")
    real_write = locations.FsspecFiles.write

    def dies_at_the_index(self, rel, data, exclusive=False):
        if rel == INDEX_NAME:
            raise ConnectionError("network lost")
        return real_write(self, rel, data, exclusive)

    monkeypatch.setattr(locations.FsspecFiles, "write", dies_at_the_index)
    with pytest.raises(StoreError, match="writing the run index failed: ConnectionError"):
        RunMirror.for_run(url, run).push()
    monkeypatch.setattr(locations.FsspecFiles, "write", real_write)
    # The copy is still the first snapshot, whole: another machine fetches and resumes it.
    b = RunMirror.for_run(url, tmp_path / "b" / "r")
    b.pull()
    assert (tmp_path / "b" / "r" / "metrics.parquet").read_bytes() == b"m" * 1000
    # That machine runs a round and pushes; the first machine's folder is now behind the copy:
    # its push is refused instead of deleting the other machine's round.
    (tmp_path / "b" / "r" / "checkpoints" / "round-002").mkdir()
    (tmp_path / "b" / "r" / "checkpoints" / "round-002" / "state.json").write_text("{}")
    b.push()
    with pytest.raises(StoreError, match="not the one this folder was last pushed as or fetched from"):
        RunMirror.for_run(url, run).push()
    with pytest.raises(StoreError, match="not the one this folder"):
        RunMirror.for_run(url, run).check_can_push()
    assert "checkpoints/round-002/state.json" in RunMirror.for_run(url, run).read_index()["files"]


def test_a_pull_is_whole_or_nothing_and_checks_the_index_first(s3, tmp_path):
    import json

    from pipeline.errors import StoreError
    from storage.run_mirror import INDEX_NAME, RunMirror

    url = f"s3://{BUCKET}/mirror3"
    RunMirror.for_run(url, _run_folder(tmp_path / "a" / "r")).push()
    index = RunMirror.for_run(url, tmp_path / "a" / "r").read_index()
    target = tmp_path / "b" / "r"
    # A swapped blob is refused, naming the file; nothing that looks like a run is left behind.
    sha = index["files"]["metrics.parquet"]["sha256"]
    s3["client"].put_object(Bucket=BUCKET, Key=f"mirror3/r/blobs/{sha}", Body=b"x" * 1000)
    with pytest.raises(StoreError, match="metrics.parquet differs from the run index"):
        RunMirror.for_run(url, target).pull()
    assert not target.exists() and list((tmp_path / "b").iterdir()) == []
    # An index naming a path outside the run folder, after valid entries, is refused before anything is fetched.
    files = dict(index["files"])
    files["zzz/../../../evil.py"] = {"size": 1, "sha256": "0" * 64}
    s3["client"].put_object(Bucket=BUCKET, Key=f"mirror3/r/{INDEX_NAME}", Body=json.dumps({"format": 2, "run_id": "r", "files": files}).encode())
    with pytest.raises(StoreError, match="outside the run folder"):
        RunMirror.for_run(url, target).pull()
    assert not target.exists() and not (tmp_path / "evil.py").exists()
    s3["client"].put_object(Bucket=BUCKET, Key=f"mirror3/r/{INDEX_NAME}", Body=b'{"format": 2, "files": {"config.json": {"size": "big"}}}')
    with pytest.raises(StoreError, match="malformed"):
        RunMirror.for_run(url, target).pull()


def test_duld_on_a_store_at_s3_keeps_its_run_at_runs_url_and_resumes_from_it(prefect_harness, s3, tmp_path):
    """`--store s3://...` for a method, `--runs-url s3://...` for its run: the same numbers as the local store,
    the run at the URL after every round, and a machine without the run folder resumes from the URL."""
    import shutil

    import pandas as pd

    from flows.duld import duld
    from flows.features import extract_features
    from flows.run_mirror import mirrored_run
    from pipeline.backbones.base import FeatureSpec
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from pipeline.errors import ConfigError
    from storage.layout import Workspace
    from storage.run_mirror import RunMirror
    from tests.tiny_runs import make_backbone

    home = tmp_path / "ws"
    ws = Workspace(home)
    root = generate_synthetic(ws.generated_dataset("synthetic"), 12, 4, 32, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(ws.manifest("synthetic", split))
    bb = make_backbone(tmp_path / "bb")
    spec = FeatureSpec(image_size=32)
    local = extract_features("synthetic", bb, spec, home=home, shard_size=8)
    remote = extract_features("synthetic", bb, spec, home=home, shard_size=8, store_url=f"s3://{BUCKET}/dstore")
    runs_url = f"s3://{BUCKET}/runs"
    engine = dict(k=3, rounds=1, steps_per_round=2, bootstrap_steps=2, batch_size=4, home=home, progress=False, views=None, threads=1)
    duld("synthetic", bb, spec, run_id="on-local", store_path=local, **engine)
    # The bootstrap only (max_rounds=0), as if the machine had been lost after it: its round is already at the URL.
    duld("synthetic", bb, spec, run_id="on-s3", store_path=remote, runs_url=runs_url, max_rounds=0, **engine)
    index = RunMirror.for_run(runs_url, ws.run_dir("on-s3")).read_index()
    assert any(name.startswith("checkpoints/bootstrap-000/") for name in index["files"])
    assert json_of(ws.run_file("on-s3", "config.json"))["feature_store"] == remote
    shutil.rmtree(ws.run_dir("on-s3"))
    with pytest.raises(ConfigError, match="already exists at"):  # a fresh run under the id would overwrite the copy
        with mirrored_run(home, "on-s3", runs_url, resume=False):
            pass
    with mirrored_run(home, "on-s3", runs_url, resume=True):  # fetched, then resumed here, then copied back
        duld("synthetic", bb, spec, run_id="on-s3", store_path=remote, runs_url=runs_url, resume=True, **engine)
    cols = ["stage", "round", "split", "metric", "repeat", "value"]
    a = pd.read_parquet(ws.run_file("on-local", "metrics.parquet"))[cols].sort_values(cols[:5]).reset_index(drop=True)
    b = pd.read_parquet(f"{runs_url}/on-s3/metrics.parquet")[cols].sort_values(cols[:5]).reset_index(drop=True)  # pandas reads the copy
    assert len(a) and a.equals(b)
    assert (ws.run_dir("on-s3") / "checkpoints" / "round-001" / "state.json").is_file()
    # The command line: `--store` takes the URL as it is (a Path would fold s3:// into s3:/), and the
    # root option --runs-url copies the run when the command ends.
    argv = ["--home", str(home), "--runs-url", runs_url, "evaluate-baseline", "random", "-d", "synthetic", "-k", "3", "--store", remote,
            "--run-id", "random-s3"]
    code = f"import sys\nfrom flows.cli import main\nsys.argv = ['uld', *{argv!r}]\nmain()\n"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "p"), **s3["env"]}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run copied:" in out.stdout and f"{runs_url}/random-s3" in out.stdout, out.stdout
    assert RunMirror.for_run(runs_url, ws.run_dir("random-s3")).read_index()["files"].keys() >= {"config.json", "metrics.parquet", "keypoints.parquet"}


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())

"""Fan the features stage's shard tasks out over a Dask cluster (Prefect's ``DaskTaskRunner``).

``uld features --dask-workers N`` starts a ``distributed.LocalCluster`` of N
single-threaded worker processes for the run; ``--dask-address tcp://host:8786``
uses a cluster that already exists (a scheduler plus workers started with
``dask scheduler`` / ``dask worker``, one per GPU). The flow is the same
:func:`flows.features.extract_features`, run with
``extract_features.with_options(task_runner=DaskTaskRunner(...))``; only how its
missing shards are computed changes:

* **One shard per task, whole shards only.** Every missing shard is one
  ``extract-shard-dask`` task; a worker reads, crops and encodes its images and
  writes that shard's files (one file per key, plus its own ``valid`` chunk), so
  no two workers ever write the same file (the store's arrays are chunked per
  shard: see :mod:`storage.features`).
* **The coordinator keeps the writer lock and the group attributes.** The flow's
  process holds the store's writer lock (:func:`storage.locks.writer_lock`) for the whole run (an
  advisory ``flock``: it keeps a second *uld command* out, and does not stop the
  workers this command dispatched). Workers never touch the group attrs (a
  read-modify-write there would race): they return the shard's skipped images,
  and the coordinator records them and only then sets the shard's completion
  marker. A worker killed mid-shard leaves its marker unset, so a re-run (or a
  Prefect retry) rewrites that shard whole.
* **Same bytes as one process.** Noise is seeded per image row and the batches
  are the store's recorded batches, so which worker computes a shard does not
  change its values (tested: a 2-worker LocalCluster store equals the
  single-process one bit for bit).
* **The model is loaded once per worker**, not shipped with every task: a
  backbone given by spec travels as a :class:`BackboneRef` and is built on first
  use in each worker process (with several GPUs, worker ``i`` of a LocalCluster
  takes ``cuda:i % n_gpus``). A backbone object (tests, notebooks) is pickled
  with its task instead.

Install: ``pip install -e '.[dask]'`` (``dask.distributed`` + ``prefect-dask``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.retry import RETRIES, RETRY_DELAY_S, retry_transient
from pipeline.backbones.base import FeatureSpec
from pipeline.errors import ULDError

if TYPE_CHECKING:
    from pipeline.backbones.base import DiffusionBackbone
    from storage.features import FeatureStore


class DaskSetupError(ULDError):
    """The Dask options are wrong or the Dask packages are missing."""


@dataclass(frozen=True)
class BackboneRef:
    """A backbone named by its spec, built inside the worker process that runs the task."""

    spec: str
    device: str
    home: str

    def load(self) -> "DiffusionBackbone":
        """The backbone for this worker (built on the first task, reused by the next ones)."""
        return _load_in_worker(self.spec, _worker_device(self.device), self.home)


@functools.lru_cache(maxsize=2)
def _load_in_worker(spec: str, device: str, home: str) -> "DiffusionBackbone":
    # Cached per worker process: loading (and hashing) the weights costs seconds, a shard far less.
    from pipeline.backbones.loading import load_backbone

    return load_backbone(spec, device, home=home)


def worker_info() -> tuple[int | None, int]:
    """(rank, threads) of the Dask worker running this code; (None, 1) outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None, 1
    name = worker.name
    rank = int(name) if isinstance(name, int) or (isinstance(name, str) and name.isdigit()) else None
    return rank, max(1, int(worker.state.nthreads))


def _worker_device(device: str) -> str:
    """``device`` resolved in the worker; ``cuda`` on a multi-GPU host spreads workers over the GPUs."""
    from pipeline.settings import resolve_device

    resolved = resolve_device(device)
    if resolved == "cuda":
        import torch

        rank, _ = worker_info()
        n = torch.cuda.device_count()
        if rank is not None and n > 1:
            return f"cuda:{rank % n}"
    return resolved


def default_workers() -> int:
    """One worker per visible GPU, else one per CPU core (``--dask-workers 0``)."""
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    return gpus or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def worker_environment() -> Any:
    """A ``dask.config`` context for starting LocalCluster workers without Dask's ``MALLOC_TRIM_THRESHOLD_``.

    Dask's nanny puts ``MALLOC_TRIM_THRESHOLD_=65536`` into every worker's environment (to give
    memory back to the OS). A fixed trim threshold also switches off glibc's adaptive mmap
    threshold, so every large tensor of a forward pass is a fresh mmap with its page faults: the
    face heads' keypoint pass ran 1.7x slower with it, in a worker and in a plain process alike
    (bench/results/rounds_dask.md). The other pre-spawn settings (one BLAS / OpenMP thread) stay.
    """
    import dask

    environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items() if k != "MALLOC_TRIM_THRESHOLD_"}
    return dask.config.set({"distributed.nanny.pre-spawn-environ": environ})


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` settings of every cluster ``uld`` starts: ``workers`` single-threaded
    processes (one model call at a time per worker) and no dashboard port to collide with other runs."""
    return {"n_workers": int(workers), "threads_per_worker": 1, "processes": True, "dashboard_address": None}


def dask_task_runner(address: str | None = None, workers: int | None = None) -> Any:
    """Prefect's ``DaskTaskRunner`` for an existing scheduler (``address``) or a new LocalCluster.

    The LocalCluster has ``workers`` processes (0: :func:`default_workers`) with one thread each: one model
    call at a time per worker, so N workers use N cores (or N GPUs) and never
    oversubscribe them.
    """
    if (address is None) == (workers is None):
        raise DaskSetupError(
            "give exactly one of --dask-address and --dask-workers",
            where="--dask-address / --dask-workers",
            fix="--dask-address tcp://HOST:8786 for a running cluster, or --dask-workers N for a local one",
        )
    if workers is not None and workers < 0:
        raise DaskSetupError(f"--dask-workers must be >= 0, got {workers}", where="--dask-workers", fix="use e.g. 2, or 0 for one per GPU (else per core)")
    if workers == 0:
        workers = default_workers()
    if address is not None and "://" not in address:
        raise DaskSetupError(
            f"--dask-address {address!r} is not a scheduler address", where="--dask-address", fix="use tcp://HOST:PORT (e.g. tcp://127.0.0.1:8786)"
        )
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise DaskSetupError(
            "the Dask task runner is not installed", where="prefect-dask / distributed",
            fix="pip install -e '.[dask]' (installs distributed and prefect-dask)",
        ) from None
    if address is not None:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(workers))


@task(
    name="extract-shard-dask", task_run_name="shard-{shard}", cache_policy=NO_CACHE, persist_result=False,
    retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient,
)
def extract_shard_on_worker(
    store_path: str,
    shard: int,
    backbone: "BackboneRef | DiffusionBackbone",
    spec: FeatureSpec,
    layers: list[str],
    paths: np.ndarray,
    batch_size: int,
    skip_bad: bool,
) -> dict:
    """One shard on a Dask worker: open the store, compute and write its data (marker left to the coordinator)."""
    import torch

    from flows.features import compute_shard
    from storage.features import FeatureStore

    _, threads = worker_info()
    torch.set_num_threads(threads)  # the worker's thread budget, not every core of the host
    model = backbone.load() if isinstance(backbone, BackboneRef) else backbone
    store = FeatureStore.open(store_path, require_complete=False, writable=True)  # a path or an fsspec URL
    return compute_shard(store, shard, model, spec, layers, paths, batch_size, skip_bad, finish=False)


def fan_out_shards(
    store: "FeatureStore",
    todo: list[int],
    backbone: "BackboneRef | DiffusionBackbone",
    spec: FeatureSpec,
    layers: list[str],
    paths: np.ndarray,
    batch_size: int,
    skip_bad: bool,
) -> list[dict]:
    """Submit one task per shard in ``todo`` to the flow's (Dask) task runner and finish each shard here.

    Must run inside a flow whose task runner is :func:`dask_task_runner`'s.
    All shards are computed concurrently; each result is then finished here, one
    at a time (this process is the only writer of the group attrs) by
    :func:`flows.features.finish_shard`, as in-process shards are.
    """
    from flows.features import finish_shard

    futures = [
        extract_shard_on_worker.submit(str(store.path), shard, backbone, spec, layers, paths, batch_size, skip_bad)
        for shard in todo
    ]
    summaries, first_error = [], None
    # Every future is waited for, also after a failure: the caller releases the writer lock when
    # this returns, and no worker may still be writing a shard then. Shards that did succeed are
    # finished, so the re-run after fixing the error redoes only the failed ones.
    for shard, future in zip(todo, futures):
        try:
            summary = future.result()
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the other shards
            first_error = first_error or err
            continue
        finish_shard(store, summary)
        summaries.append(summary)
    if first_error is not None:
        raise first_error
    return summaries


def extract_features_dask(
    dataset: str,
    backbone: "str | DiffusionBackbone",
    spec: FeatureSpec | None = None,
    *,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    **options: Any,
) -> "Path | str":
    """:func:`flows.features.extract_features` with its shards fanned out over Dask; returns the store path.

    ``options`` are the flow's other keyword arguments (``home``, ``device``,
    ``batch_size``, ``shard_size``, ``skip_bad``, ``data_root``, ``deep_check``).
    """
    from flows.features import extract_features

    runner = dask_task_runner(dask_address, dask_workers)
    # distributed logs every scheduler/nanny event at INFO through Prefect's handler: keep warnings only.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with worker_environment():  # the runner starts its LocalCluster (if any) inside the flow call
        return extract_features.with_options(task_runner=runner)(dataset, backbone, spec, fan_out=True, **options)

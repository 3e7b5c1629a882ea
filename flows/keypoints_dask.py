"""The rounds' keypoint extraction fanned out over Dask (``uld train --dask-workers N``).

Every self-training round of the engine (D-ULD, Mallis (D), D-ULD++) runs its
trained heads over all training images to detect keypoints and sample their
descriptors (paper 001, Sec 3.2 step 1); on a large dataset that pass over the
cached features is the part of a round worth spreading over machines. Here it
is split into blocks of consecutive training rows, one Prefect task
(``keypoints-block``) each, submitted to the round subflow's
``DaskTaskRunner``; the round then clusters the concatenated result in its own
process, as before.

* **Same result as one process.** A block is a whole number of the engine's
  evaluation batches (``RunContext.eval_batch``), so every image is processed in
  the same batch, with the same batch mates, as in the single-process pass, and
  the blocks are concatenated in row order: the keypoints are bit-identical
  (tested on a 2-worker LocalCluster).
* **What travels.** The heads' config and weights (a few hundred KB: tensors,
  sent by Dask between this run's own processes), the detector settings, the
  block's rows and RoIs, and the store's location: each worker opens the store
  itself (a local path every worker sees, or an fsspec URL), so no features are
  shipped.
* **Only reads.** Workers write nothing; a lost worker's block is retried or the
  round fails and ``--resume`` redoes it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.retry import RETRIES, RETRY_DELAY_S, retry_transient
from pipeline.labelling.base import KeypointSet

if TYPE_CHECKING:
    from pipeline.heads.model import ULDHeads
    from pipeline.methods.duld import DULDConfig
    from storage.features import FeatureStore

#: Evaluation batches per block (1,024 images of 32): ~2.2 s of work per task on one CPU core for
#: the face heads, against ~0.15 s of Prefect bookkeeping per task and the result transfer
#: (bench/results/rounds_dask.md: 8 batches a block was slower); a 200k-image round still makes
#: ~200 tasks to spread.
BATCHES_PER_BLOCK = 32


def row_blocks(rows: np.ndarray, batch: int, batches_per_block: int) -> list[np.ndarray]:
    """``rows`` in consecutive blocks of ``batch * batches_per_block`` (the last one shorter)."""
    size = max(1, int(batch) * int(batches_per_block))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


@task(
    name="keypoints-block", task_run_name="keypoints-{first_row}", cache_policy=NO_CACHE, persist_result=False,
    retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient,
)
def keypoints_block_task(
    store_path: str, heads_config: dict, weights: dict, config: "DULDConfig", rows: np.ndarray, rois: np.ndarray | None,
    batch: int, first_row: int,
) -> dict[str, np.ndarray]:
    """One block on a Dask worker: the heads rebuilt from ``heads_config`` / ``weights``, keypoints of ``rows``."""
    import torch

    from flows.features_dask import worker_info
    from pipeline.heads.model import ULDHeads, ULDHeadsConfig
    from pipeline.methods.duld import extract_keypoints
    from storage.feature_loader import make_loader
    from storage.features import FeatureStore

    _, threads = worker_info()
    torch.set_num_threads(threads)
    model = ULDHeads(ULDHeadsConfig.from_json(heads_config))
    model.load_state_dict(weights)
    store = FeatureStore.open(store_path)
    # ``rois`` is indexed by store row (extract_keypoints' contract): a sparse copy holding the block's rows.
    full = None
    if rois is not None:
        full = np.zeros((len(store), 4), np.float32)
        full[rows] = rois
    kp = extract_keypoints(model, make_loader(store, rows, batch_size=batch, shuffle=False), config, progress=False, rois=full)
    return kp.arrays()


def concat_keypoints(parts: list[KeypointSet], descriptor_dim: int) -> KeypointSet:
    """The keypoint sets of consecutive blocks as one (the order of ``parts``)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return KeypointSet(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, descriptor_dim), np.float32))
    peak = None if parts[0].peak is None else np.concatenate([p.peak for p in parts])
    return KeypointSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("rows", "xy", "score", "desc")), peak)


def fan_out_keypoints(
    store: "FeatureStore", model: "ULDHeads", rows: np.ndarray, config: "DULDConfig", rois: np.ndarray | None, batch: int
) -> KeypointSet:
    """:func:`pipeline.methods.duld.extract_keypoints` over ``rows``, one task per block on the flow's task runner.

    Must run inside a flow whose task runner is a ``DaskTaskRunner`` (the engine's round
    subflows with ``--dask-workers`` / ``--dask-address``); results are gathered in block order.
    """
    heads_config = model.config.to_json()
    weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    futures = [
        keypoints_block_task.submit(str(store.path), heads_config, weights, config, block, None if rois is None else rois[block], int(batch), int(block[0]))
        for block in row_blocks(np.asarray(rows), batch, BATCHES_PER_BLOCK)
    ]
    return concat_keypoints([KeypointSet.from_arrays(f.result()) for f in futures], model.config.descriptor_dim)


@contextlib.contextmanager
def dask_scheduler(address: str | None, workers: int | None) -> Iterator[str]:
    """The address of the scheduler the engine's rounds submit to: ``address`` as given, or a
    LocalCluster of ``workers`` single-threaded processes (0: one per GPU, else per core) that
    lives for the ``with`` block (one cluster for all rounds, not one per round subflow)."""
    from flows.features_dask import DaskSetupError, dask_task_runner, default_workers, local_cluster_kwargs, worker_environment

    dask_task_runner(address, workers)  # the same option checks (and install hint) as `uld features`
    if address is not None:
        yield address
        return
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    n = default_workers() if workers == 0 else int(workers)
    with worker_environment():  # for the whole run: a nanny that restarts a worker reads it again
        try:
            cluster = LocalCluster(**local_cluster_kwargs(n))
        except OSError as exc:  # pragma: no cover - ports or processes refused by the machine
            raise DaskSetupError(f"cannot start a local Dask cluster: {exc}", where="--dask-workers", fix="use fewer workers or --dask-address") from None
        try:
            yield cluster.scheduler_address
        finally:
            cluster.close()


def round_task_runner(address: str | None) -> dict[str, Any]:
    """``with_options`` keywords of a round subflow: the Dask runner on ``address``, or none (the default)."""
    if address is None:
        return {}
    from prefect_dask import DaskTaskRunner

    return {"task_runner": DaskTaskRunner(address=address)}

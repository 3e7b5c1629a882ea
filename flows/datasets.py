"""The datasets stage: read a dataset's real on-disk layout into manifests.

``build_manifests`` is a Prefect flow with one task per split; each task runs
the dataset's loader (``pipeline.datasets``), and the flow writes
``<home>/manifests/<dataset>/<split>.parquet`` and, when ``skip_bad`` dropped
anything, ``skipped.parquet`` with one row per dropped item and its reason.
Nothing is written until every split has loaded, so a failing split never
leaves a mix of old and new manifests behind. Re-running replaces the files.

``load_manifest`` is the plain function every later stage uses to read them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.datasets.base import Manifest, SkipRecord
from pipeline.datasets.registry import get_loader
from pipeline.errors import ConfigError, DatasetError
from storage.layout import Workspace
from storage.tables import write_table


def default_root(dataset: str, home: str | Path, data_root: str | Path | None = None) -> Path:
    """Where a dataset is read from when no ``--root`` is given.

    ``synthetic`` lives in the workspace (``<home>/datasets/synthetic``, written
    by ``uld datasets generate synthetic``); every other dataset in
    ``<data_root>/<dataset>`` (``--data-root`` / ``$ULD_DATA``).
    """
    if dataset == "synthetic":
        return Workspace(Path(home)).generated_dataset("synthetic")
    if data_root is None:
        raise ConfigError(f"no folder given for dataset {dataset!r}", where="--root",
                          fix=f"pass --root pointing at the {dataset} data, or set --data-root / $ULD_DATA")
    return Path(data_root) / dataset


def manifest_command(dataset: str) -> str:
    """The command that builds ``dataset``'s manifests (for error messages)."""
    if dataset == "synthetic":
        return "uld datasets generate synthetic"
    return f"uld datasets manifest {dataset} --root PATH"


def load_manifest(home: str | Path, dataset: str, split: str) -> Manifest:
    """Read the manifest of ``dataset``/``split`` from the workspace at ``home``."""
    path = Workspace(Path(home)).manifest(dataset, split)
    if not path.is_file():
        raise DatasetError(
            f"no manifest for dataset {dataset!r}, split {split!r}",
            where=str(path),
            fix=f"build it first: `{manifest_command(dataset)}` (with the same --home)",
        )
    return Manifest.load(path)


def skipped_frame(dataset: str, skipped: list[SkipRecord]) -> pd.DataFrame:
    """``skipped`` records as a table of kind ``skipped``."""
    return pd.DataFrame(
        {
            "dataset": [dataset] * len(skipped),
            "source": [s.source for s in skipped],
            "line": [s.line for s in skipped],
            "reason": [s.reason for s in skipped],
        }
    )


@task(name="load-split", task_run_name="load-{split}", cache_policy=NO_CACHE)
def load_split(dataset: str, root: Path, split: str, skip_bad: bool) -> tuple[Manifest, list[SkipRecord]]:
    """Run the loader for one split (all validation happens in the loader)."""
    manifest, skipped = get_loader(dataset).load(root, split, skip_bad=skip_bad)
    get_run_logger().info("%s/%s: %d images, %d skipped", dataset, split, len(manifest), len(skipped))
    return manifest, skipped


@flow(name="build-manifests", flow_run_name="manifests-{dataset}")
def build_manifests(
    dataset: str,
    root: Path | None = None,
    home: Path = Path("workspace"),
    skip_bad: bool = False,
) -> dict[str, Path]:
    """Build and write the manifests of every split of ``dataset``; returns split -> path.

    ``root`` defaults to :func:`default_root` for ``synthetic`` (no data root is
    needed there); other datasets need it.
    """
    log = get_run_logger()
    loader = get_loader(dataset)
    ws = Workspace(Path(home))
    root = Path(root) if root is not None else default_root(dataset, home)
    futures = {split: load_split.submit(dataset, root, split, skip_bad) for split in loader.meta.splits}
    results = {split: future.result() for split, future in futures.items()}

    paths: dict[str, Path] = {}
    all_skipped = [s for _, skipped in results.values() for s in skipped]
    skipped_path = ws.skipped(dataset)
    if sum(len(m) for m, _ in results.values()) == 0:
        # Nothing usable: writing empty manifests would only move the failure to a later
        # stage. Like any failed load, nothing is written (old manifests stay as they were).
        if all_skipped:
            shown = "; ".join(f"{s.reason} ({s.source}{f', line {s.line}' if s.line > 0 else ''})" for s in all_skipped[:3])
            raise DatasetError(
                f"{dataset}: every item was bad and skipped ({len(all_skipped)} items), so no manifest was written; "
                f"first reasons: {shown}",
                where=str(root),
                fix="run without --skip-bad to stop at the first bad item with its file and line, and repair the data",
            )
        raise DatasetError(
            f"{dataset}: no items found, so there is nothing to write",
            where=str(root),
            fix=f"point --root at the dataset folder laid out as: {loader.expected_layout}",
        )
    for split, (manifest, _) in results.items():
        if len(manifest) == 0:
            log.warning("%s/%s has no images; later stages will refuse this split", dataset, split)
        paths[split] = manifest.save(ws.manifest(dataset, split))
    if all_skipped:
        write_table(skipped_frame(dataset, all_skipped), skipped_path, "skipped", metadata={"root": str(root)})
        log.warning("%s: skipped %d bad item(s); reasons in %s", dataset, len(all_skipped), skipped_path)
    elif skipped_path.exists():
        # A stale list from an earlier run would describe data this manifest no longer reflects.
        skipped_path.unlink()
    return paths

"""The workspace layout shared by every stage.

::

    <home>/
      manifests/<dataset>/<split>.parquet        canonical manifest per split
      manifests/<dataset>/skipped.parquet        items dropped by --skip-bad, with reasons
      datasets/<name>/                           generated datasets (synthetic)
      features/<dataset>/<backbone>.zarr/<config_hash>/   one Zarr group per feature config
      features/<dataset>/<backbone>.zarr/<config_hash>.views-<hash>/  augmented training views (D-ULD)
      backbones/<name>/                          backbones trained here (save_pretrained)
      runs/<run_id>/config.json                  the run's full configuration
      runs/<run_id>/keypoints.parquet            discovered landmarks (original pixels)
      runs/<run_id>/pseudolabels.parquet         cluster labels per round
      runs/<run_id>/metrics.parquet              long-format metrics
      runs/<run_id>/errors.parquet               per-image errors (CED, yaw splits)
      runs/<run_id>/checkpoints/<stage>-<round>/ safetensors + config.json
      runs/<run_id>/figures/*.png                plots
      probes/<dataset>/<backbone>/<store_hash>/  feature probe: probe.parquet + probe.png
      ablations/<id>/                            `uld ablation`: ablation.parquet + ablation.md
      cache/backbone-identities.json             backbone identities by file content (storage.backbone_identities)

Paths are computed here and nowhere else. A feature store may also live under
an fsspec URL (``uld features --store-url s3://bucket/prefix``): then it is
``<url>/<dataset>/<backbone>.zarr/<config_hash>``, the same layout below the URL
(:func:`feature_store_location`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from storage.locations import is_url, join

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(kind: str, name: str) -> str:
    """Names become directory names: refuse anything that could escape the workspace."""
    if not _NAME.match(name or ""):
        raise ConfigError(
            f"invalid {kind} name {name!r}",
            where=kind,
            fix="use letters, digits, '.', '_' and '-' only, starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class Workspace:
    home: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home))

    # datasets -------------------------------------------------------------
    def manifest_dir(self, dataset: str) -> Path:
        return self.home / "manifests" / check_name("dataset", dataset)

    def manifest(self, dataset: str, split: str) -> Path:
        return self.manifest_dir(dataset) / f"{check_name('split', split)}.parquet"

    def skipped(self, dataset: str) -> Path:
        return self.manifest_dir(dataset) / "skipped.parquet"

    def generated_dataset(self, name: str) -> Path:
        return self.home / "datasets" / check_name("dataset", name)

    # features -------------------------------------------------------------
    def feature_root(self, dataset: str, backbone: str) -> Path:
        return self.home / "features" / check_name("dataset", dataset) / f"{check_name('backbone', backbone)}.zarr"

    def feature_store(self, dataset: str, backbone: str, config_hash: str) -> Path:
        return self.feature_root(dataset, backbone) / check_name("config hash", config_hash)

    def view_store(self, dataset: str, backbone: str, config_hash: str, views_hash: str) -> Path:
        """Features of augmented training views, next to the main store ``config_hash`` (D-ULD bootstrapping)."""
        return self.feature_root(dataset, backbone) / f"{check_name('config hash', config_hash)}.views-{check_name('views hash', views_hash)}"

    # backbones ------------------------------------------------------------
    def backbone_dir(self, name: str) -> Path:
        return self.home / "backbones" / check_name("backbone", name)

    # feature probes -------------------------------------------------------
    def probe_dir(self, dataset: str, backbone: str, store_hash: str) -> Path:
        """Results of ``uld backbone probe`` on the feature store ``store_hash`` (a re-run overwrites them)."""
        return self.home / "probes" / check_name("dataset", dataset) / check_name("backbone", backbone) / check_name("store hash", store_hash)

    # runs -----------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / check_name("run id", run_id)

    def run_file(self, run_id: str, name: str) -> Path:
        return self.run_dir(run_id) / name

    def checkpoint_dir(self, run_id: str, stage: str, round_: int) -> Path:
        return self.run_dir(run_id) / "checkpoints" / f"{check_name('stage', stage)}-{int(round_):03d}"

    def figures_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "figures"

    def report_dir(self, name: str) -> Path:
        """``reports/<name>/``: a comparison of several runs (`uld report R1 R2 --out`, the demo's)."""
        return self.home / "reports" / check_name("report name", name)

    # ablations -------------------------------------------------------------
    def ablation_dir(self, ablation_id: str) -> Path:
        """``ablations/<id>/``: `uld ablation`'s ablation.parquet + ablation.md (its runs live under runs/)."""
        return self.home / "ablations" / check_name("ablation id", ablation_id)

    # caches ---------------------------------------------------------------
    def cache_dir(self) -> Path:
        """Records that only save work (backbone identities, no-op records): safe to delete."""
        return self.home / "cache"

    def backbone_identities(self) -> Path:
        return self.cache_dir() / "backbone-identities.json"


def feature_store_location(home: str | Path, dataset: str, backbone: str, config_hash: str, store_url: str | None = None) -> Path | str:
    """Where the store of (dataset, backbone, config hash) lives: the workspace's ``features/`` or below ``store_url``.

    ``store_url`` is a local folder or an fsspec URL standing in for ``<home>/features``;
    a URL gives a URL string, a local location a Path.
    """
    if store_url is None:
        return Workspace(Path(home)).feature_store(dataset, backbone, config_hash)
    root = join(store_url, check_name("dataset", dataset), f"{check_name('backbone', backbone)}.zarr", check_name("config hash", config_hash))
    return root if is_url(store_url) else Path(root)

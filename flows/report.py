"""``uld report``: a finished run's results as one self-contained HTML page.

Plain functions (no Prefect): reads the run folder's config.json, its tables
(through :mod:`storage.tables`), its feature store's description and the
figures the run wrote; :mod:`pipeline.report` renders the page.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import StoreError, ULDError
from pipeline.report import ReportData, render_html
from storage.atomic import write_bytes
from storage.layout import Workspace
from storage.run_models import is_run_dir, read_store_recipe, resolve_store_path
from storage.tables import read_table

REPORT_NAME = "report.html"
OVERLAY_DIR = "overlays"  # figures/overlays/: one PNG per image (flows.discover)
N_OVERLAYS = 8


def find_run_dir(run: str | Path, home: str | Path | None = None) -> Path:
    """A run folder given as a path, or as a run id under ``home``/runs; a clear error otherwise."""
    path = Path(run)
    candidates = [path]
    if home is not None and len(path.parts) == 1:
        candidates.append(Workspace(Path(home)).home / "runs" / path.name)
    for c in candidates:
        if is_run_dir(c):
            return c
    raise StoreError(
        "not a run folder (a run folder holds the config.json a method wrote, naming its method)",
        where=str(path),
        fix="pass a folder under <home>/runs/ (e.g. workspace/runs/zeroshot-...), or a run id with --home",
    )


def _run_file(run_dir: Path, name: str) -> Path:
    return Workspace(run_dir.parent.parent).run_file(run_dir.name, name)


def _figures(run_dir: Path) -> list[tuple[str, bytes]]:
    fig_dir = Workspace(run_dir.parent.parent).figures_dir(run_dir.name)
    if not fig_dir.is_dir():
        return []
    pngs = sorted(fig_dir.glob("*.png"))
    # Contact sheets first (what the landmarks look like), then the CED curves and the rest.
    pngs.sort(key=lambda p: (not p.stem.endswith("-landmarks"), p.name))
    # A few per-image overlays (`uld discover` writes them), test images first.
    overlays = sorted((fig_dir / OVERLAY_DIR).glob("*.png"), key=lambda p: (not p.name.startswith("test-"), p.name))[:N_OVERLAYS]
    return [(f"figures/{p.relative_to(fig_dir).as_posix()}", p.read_bytes()) for p in pngs + overlays]


def collect(run_dir: Path) -> ReportData:
    """Everything the report of the run at ``run_dir`` shows; missing parts become notes."""
    config = json.loads(_run_file(run_dir, "config.json").read_text())
    data = ReportData(run_id=str(config.get("run_id", run_dir.name)), config=config)
    for name, kind, attr in (("metrics.parquet", "metrics", "metrics"), ("keypoints.parquet", "keypoints", "keypoints")):
        path = _run_file(run_dir, name)
        if path.is_file():
            setattr(data, attr, read_table(path, kind))
        else:
            data.notes.append(f"the run has no {name} (not finished or not evaluated)")
    store = config.get("store_path") or config.get("feature_store")
    if store:
        try:
            recipe = read_store_recipe(resolve_store_path(store, run_dir))
            data.feature_spec = {
                "backbone_name": recipe.backbone_name, "config_hash": recipe.config_hash, "image_size": recipe.image_size,
                "keys": recipe.keys, "spec": recipe.spec, "backbone_identity": recipe.backbone_identity,
            }
        except ULDError as err:
            data.feature_note = f"feature spec not shown: {err.what}"
    else:
        data.feature_note = "the run's config names no feature store"
    data.images = _figures(run_dir)
    return data


def write_report(run: str | Path, out: str | Path | None = None, home: str | Path | None = None) -> Path:
    """Write the HTML report of ``run`` (folder or run id) to ``out`` (default ``<run>/report.html``)."""
    run_dir = find_run_dir(run, home)
    out = Path(out) if out is not None else _run_file(run_dir, REPORT_NAME)
    write_bytes(out, render_html(collect(run_dir)).encode("utf-8"))
    return out

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
from pipeline.report_compare import RunView
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
    pose = _run_file(run_dir, "pose-clusters.parquet")  # D-ULD++ runs (flows.duldpp_stages)
    if pose.is_file():
        data.pose_clusters = read_table(pose, "pose_clusters")
    return data


def write_report(run: str | Path, out: str | Path | None = None, home: str | Path | None = None) -> Path:
    """Write the HTML report of ``run`` (folder or run id) to ``out`` (default ``<run>/report.html``)."""
    run_dir = find_run_dir(run, home)
    out = Path(out) if out is not None else _run_file(run_dir, REPORT_NAME)
    write_bytes(out, render_html(collect(run_dir)).encode("utf-8"))
    return out


# ------------------------------------------------------------ several runs
COMPARE_HTML, COMPARE_MD = "report.html", "report.md"


def collect_run_view(run_dir: Path, notes: list[str]) -> "RunView":
    """One run's tables, its NME-against-regressor-images curve and its contact sheet, for the comparison.

    The curve needs the dataset's manifests in the run's workspace; without them a note says so.
    """
    from flows.results import regressor_size_curve
    from pipeline.report_compare import RunView, _protocol_rows, last_stage

    config = json.loads(_run_file(run_dir, "config.json").read_text())
    view = RunView(run_id=str(config.get("run_id", run_dir.name)), config=config)
    for name, kind, attr in (("metrics.parquet", "metrics", "metrics"), ("errors.parquet", "errors", "errors")):
        path = _run_file(run_dir, name)
        if path.is_file():
            setattr(view, attr, read_table(path, kind))
        else:
            notes.append(f"{view.run_id}: no {name} (not finished or not evaluated)")
    key = last_stage(view.metrics)
    if key is not None and config.get("dataset"):
        main = _protocol_rows(view.metrics)
        protocol, box = str(main["protocol"].iloc[0]), str(main["box"].iloc[0])
        try:
            view.regressor_curve = regressor_size_curve(run_dir.parent.parent, run_dir.name, str(config["dataset"]), *key,
                                                        protocol=protocol, box=box, seed=int(config.get("seed", 0)))
        except ULDError as err:
            notes.append(f"{view.run_id}: NME against regressor images not computed: {err.what}")
    fig_dir = Workspace(run_dir.parent.parent).figures_dir(run_dir.name)
    sheets = sorted(fig_dir.glob("*-landmarks.png")) if fig_dir.is_dir() else []
    if sheets:
        view.sheet = (sheets[0].name, sheets[0].read_bytes())
    return view


def write_comparison(runs: list[str | Path], out_dir: str | Path, home: str | Path | None = None) -> tuple[Path, Path]:
    """Compare several runs: ``out_dir/report.html`` (self-contained) and its Markdown twin
    ``out_dir/report.md`` with the plots as PNG files beside it. Returns both paths."""
    from pipeline.report_compare import CompareData, compare_figures, render_compare_html, render_compare_markdown

    dirs = [find_run_dir(r, home) for r in runs]
    names = [d.resolve() for d in dirs]
    if len(set(names)) != len(names):
        raise StoreError("the same run is named twice", where=" ".join(str(r) for r in runs), fix="name each run once")
    notes: list[str] = []
    data = CompareData([collect_run_view(d, notes) for d in dirs], notes)
    figures = compare_figures(data)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StoreError("--out must be a folder when several runs are compared", where=str(out), fix="pass a folder path (it is created)")
    for stem, _, png in figures:
        write_bytes(out / f"{stem}.png", png)
    html_path, md_path = out / COMPARE_HTML, out / COMPARE_MD
    write_bytes(html_path, render_compare_html(data, figures).encode("utf-8"))
    write_bytes(md_path, render_compare_markdown(data, figures).encode("utf-8"))
    return html_path, md_path

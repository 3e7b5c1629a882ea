"""Several runs side by side: one self-contained HTML page and its Markdown twin.

Data in, text and PNG bytes out (``flows.report.write_comparison`` reads the run
folders). Every plot is drawn here from the runs' tables -- CED curves from the
per-image errors, not the PNGs the runs wrote -- so all runs share axes and
colours (run i is colour Ci in every plot). What is compared for each run is its
last evaluated (stage, round); metrics evaluated under several protocols or box
rules give one table row each, and the plots use the ``paper`` / ``landmarks``
rows when the run has them (else the first protocol it was evaluated under).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.nme import ced_curve
from pipeline.report import (
    _CSS,
    _PER_GT,
    HEADLINE_METRICS,
    SHORT_NAMES,
    _figure,
    _html_table,
    _img,
    _kv_table,
    _mean_rows,
    _png,
    _stage_order,
    flatten,
    fmt,
    main_protocol_rows,
)

CED_MAX = 10.0  # % of the normaliser, as flows.results draws a run's own CED curves
_MAIN = ("paper", "landmarks")


@dataclass
class RunView:
    """One run as the comparison sees it. ``regressor_curve``: rows of
    ``pipeline.evaluation.regressor_curve.nme_by_regressor_size`` for the run's last
    evaluated stage (or None); ``sheet``: its landmark contact sheet (caption, PNG)."""

    run_id: str
    config: dict[str, Any]
    metrics: pd.DataFrame | None = None
    errors: pd.DataFrame | None = None
    regressor_curve: pd.DataFrame | None = None
    sheet: tuple[str, bytes] | None = None


@dataclass
class CompareData:
    runs: list[RunView]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------ selection
def _protocol_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return main_protocol_rows(frame)


def last_stage(metrics: pd.DataFrame | None) -> tuple[str, str, int] | None:
    """(method, stage, round) of the run's last evaluated stage (test nme_forward rows), or None."""
    if metrics is None or metrics.empty:
        return None
    m = _mean_rows(metrics)
    m = m[(m["split"] == "test") & (m["metric"] == "nme_forward")]
    if m.empty:
        return None
    last = _stage_order(m[["method", "stage", "round"]].drop_duplicates()).iloc[-1]
    return str(last["method"]), str(last["stage"]), int(last["round"])


def _at(frame: pd.DataFrame, key: tuple[str, str, int]) -> pd.DataFrame:
    return frame[(frame["method"] == key[0]) & (frame["stage"] == key[1]) & (frame["round"] == key[2])]


def comparison_table(runs: list[RunView]) -> pd.DataFrame:
    """One row per (run, protocol, box) of each run's last evaluated stage, headline metrics as columns."""
    out = []
    for run in runs:
        key = last_stage(run.metrics)
        if key is None:
            continue
        m = _at(_mean_rows(run.metrics), key)
        m = m[(m["split"] == "test") & m["metric"].isin(HEADLINE_METRICS)]
        wide = m.pivot_table(index=["protocol", "box"], columns="metric", values="value", aggfunc="last").reset_index()
        wide.insert(0, "run", run.run_id)
        wide.insert(1, "method", key[0])
        wide.insert(2, "stage", f"{key[1]} {key[2]}")
        wide.insert(3, "dataset", str(run.config.get("dataset", "?")))
        out.append(wide)
    if not out:
        return pd.DataFrame()
    table = pd.concat(out, ignore_index=True)
    # Within a run the default protocol / box first, then the others by name.
    table["_main"] = [(p, b) != _MAIN for p, b in zip(table["protocol"], table["box"])]
    table = table.sort_values(["_main", "protocol", "box"], kind="stable").sort_values("run", key=lambda c: c.map({r.run_id: i for i, r in enumerate(runs)}), kind="stable")
    cols = ["run", "method", "stage", "dataset", "protocol", "box"] + [c for c in HEADLINE_METRICS if c in table.columns]
    table = table[cols]
    table.columns.name = None
    return table


# ------------------------------------------------------------ plots
def _colour(i: int) -> str:
    return f"C{i % 10}"


def ced_plot(runs: list[RunView]) -> bytes | None:
    """CED curves (forward and backward) of each run's last evaluated stage, from its per-image errors."""
    series = []
    for i, run in enumerate(runs):
        key = last_stage(run.metrics)
        if key is None or run.errors is None or run.errors.empty:
            continue
        err = _protocol_rows(_at(run.errors, key))
        err = err[err["split"] == "test"]
        series.append((i, run.run_id, {d: err[err["direction"] == d]["nme"].to_numpy(np.float64) for d in ("forward", "backward")}))
    if not series:
        return None
    # The usual 10 % range, widened when most errors lie beyond it (weak runs would be flat at 0).
    every = np.concatenate([v for _, _, per in series for v in per.values()])
    every = every[np.isfinite(every)]
    top = max(CED_MAX, float(np.ceil(np.percentile(every, 90) / 10) * 10)) if every.size else CED_MAX
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, sharey=True)
    for ax, direction in zip(axes, ("forward", "backward")):
        for i, name, per in series:
            t, frac, auc = ced_curve(per[direction], top)
            ax.plot(t, frac, color=_colour(i), label=f"{name} (AUC@{top:g} {fmt(auc)})")
        ax.set_title(f"CED, {direction} (test)")
        ax.set_xlabel("NME (% of normaliser)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("share of test images")
    return _png(fig)


def yaw_plot(runs: list[RunView]) -> bytes | None:
    """Forward NME per yaw bin of each run's last evaluated stage (grouped bars, one colour per run)."""
    per_run = []
    for i, run in enumerate(runs):
        key = last_stage(run.metrics)
        if key is None:
            continue
        m = _protocol_rows(_at(_mean_rows(run.metrics), key))
        m = m[(m["split"] == "test") & m["metric"].str.match(r"^nme_forward_yaw")]
        if not m.empty:
            per_run.append((i, run.run_id, m.assign(bin=m["metric"].str.replace("nme_forward_yaw", "", regex=False)).set_index("bin")["value"]))
    if not per_run:
        return None
    bins = list(dict.fromkeys(b for _, _, s in per_run for b in s.index))
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    width = 0.8 / len(per_run)
    for j, (i, name, s) in enumerate(per_run):
        ax.bar(np.arange(len(bins)) + (j - (len(per_run) - 1) / 2) * width, [s.get(b, np.nan) for b in bins], width, color=_colour(i), label=name)
    ax.set_xticks(np.arange(len(bins)))
    ax.set_xticklabels(bins, fontsize=8)
    ax.set_xlabel("yaw bin (degrees)")
    ax.set_ylabel("forward NME (%)")
    ax.set_title("forward NME per yaw bin (test)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def rounds_plot(runs: list[RunView]) -> bytes | None:
    """Forward and backward NME against the round, one line per run (runs with one round are points)."""
    lines = []
    for i, run in enumerate(runs):
        if last_stage(run.metrics) is None:
            continue
        m = _protocol_rows(_mean_rows(run.metrics))
        m = m[(m["split"] == "test") & m["metric"].isin(["nme_forward", "nme_backward"])]
        wide = m.pivot_table(index="round", columns="metric", values="value", aggfunc="last").sort_index()
        lines.append((i, run.run_id, wide))
    if not lines or all(len(w) < 2 for _, _, w in lines):
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110, sharey=True)
    for ax, metric in zip(axes, ("nme_forward", "nme_backward")):
        for i, name, wide in lines:
            if metric in wide.columns:
                ax.plot(wide.index, wide[metric], "-o", color=_colour(i), label=name)
        ax.set_title(f"{metric} per round (test)")
        ax.set_xlabel("round (0 = bootstrap / the only one)")
        ax.set_xticks(sorted({int(r) for _, _, w in lines for r in w.index}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("NME (%)")
    return _png(fig)


def hungarian_plot(runs: list[RunView]) -> bytes | None:
    """Per-ground-truth-landmark accuracy after Hungarian matching (the paper's Fig. 4), one bar per run."""
    per_run, names = [], {}
    for i, run in enumerate(runs):
        key = last_stage(run.metrics)
        if key is None:
            continue
        m = _protocol_rows(_at(_mean_rows(run.metrics), key))
        acc = {}
        for r in m[m["split"] == "test"].itertuples(index=False):
            hit = _PER_GT.match(str(r.metric))
            if hit and not hit["name"].startswith("hungarian"):
                acc[int(hit["l"])] = float(r.value)
                names[int(hit["l"])] = hit["name"]
        if acc:
            per_run.append((i, run.run_id, acc))
    if not per_run:
        return None
    gts = sorted(names)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(gts) * len(per_run) + 2), 3.6), dpi=110)
    width = 0.8 / len(per_run)
    for j, (i, name, acc) in enumerate(per_run):
        ax.bar(np.arange(len(gts)) + (j - (len(per_run) - 1) / 2) * width, [acc.get(g, np.nan) for g in gts], width, color=_colour(i), label=name)
    ax.set_xticks(np.arange(len(gts)))
    ax.set_xticklabels([names[g] for g in gts], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy at 0.2 x normaliser")
    ax.set_title("per ground-truth landmark, after Hungarian matching (test)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def regressor_plot(runs: list[RunView]) -> bytes | None:
    """NME against the number of regressor images (forward solid, backward dashed), one colour per run."""
    curves = [(i, r.run_id, r.regressor_curve) for i, r in enumerate(runs) if r.regressor_curve is not None and not r.regressor_curve.empty]
    if not curves:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for i, name, c in curves:
        for direction, style in (("forward", "-o"), ("backward", "--s")):
            d = c[c["direction"] == direction].drop_duplicates("n_fit").sort_values("n_fit")
            ax.plot(d["n_fit"], d["nme"], style, color=_colour(i), label=f"{name} {direction}")
    ax.set_xscale("log")
    ax.set_xlabel("training images the regressors are fitted on")
    ax.set_ylabel("NME (%)")
    ax.set_title("NME against regressor images (test)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def compare_figures(data: CompareData) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) of every comparison plot the runs have data for, then each run's contact sheet."""
    figs = [("ced", "CED curves, forward and backward", ced_plot(data.runs)),
            ("rounds", "NME per round", rounds_plot(data.runs)),
            ("yaw", "forward NME per yaw bin", yaw_plot(data.runs)),
            ("hungarian", "per-landmark Hungarian accuracy", hungarian_plot(data.runs)),
            ("regressor_images", "NME against the number of regressor images", regressor_plot(data.runs))]
    out = [(stem, cap, png) for stem, cap, png in figs if png is not None]
    for i, run in enumerate(data.runs):
        if run.sheet is not None:
            out.append((f"landmarks_{i}", f"{run.run_id}: {run.sheet[0]}", run.sheet[1]))
    return out


# ------------------------------------------------------------ pages
def _title(data: CompareData) -> str:
    return f"uld comparison: {len(data.runs)} runs"


def render_compare_html(data: CompareData, figures: list[tuple[str, str, bytes]] | None = None) -> str:
    """The comparison page (one string, images inlined)."""
    figures = compare_figures(data) if figures is None else figures
    title = _title(data)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append(_kv_table([(f"run {i}", f"{r.run_id} ({r.config.get('method', '?')} on {r.config.get('dataset', '?')})") for i, r in enumerate(data.runs)]))
    for note in data.notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h2>Comparison (test split, last evaluated stage of each run, mean over regressor repeats)</h2>")
    table = comparison_table(data.runs)
    parts.append(_html_table(table.rename(columns=SHORT_NAMES), "metrics") if not table.empty
                 else "<p class='note'>no run has ground-truth scores</p>")
    parts.append("<p class='note'>NME in % of the dataset's normaliser; protocol: how the regressors were fitted "
                 "(paper / mallis / lstsq); box: the normalising box of box-normalised datasets (landmarks / image).</p>")
    plots = [(c, p) for stem, c, p in figures if not stem.startswith("landmarks_")]
    sheets = [(c, p) for stem, c, p in figures if stem.startswith("landmarks_")]
    if plots:
        parts.append("<h2>Plots</h2><div class='figs'>" + "".join(_img(c, p) for c, p in plots) + "</div>")
    if sheets:
        parts.append("<h2>Landmarks on test images (same landmark, same colour)</h2>" + "".join(_img(c, p) for c, p in sheets))
    parts.append("<h2>Runs</h2>")
    for r in data.runs:
        parts.append(f"<details><summary>{html.escape(r.run_id)}: configuration</summary>{_kv_table(flatten(r.config))}</details>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (values as :func:`pipeline.report.fmt` prints them)."""
    if frame is None or frame.empty:
        return "_none_\n"
    head = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def render_compare_markdown(data: CompareData, figures: list[tuple[str, str, bytes]] | None = None) -> str:
    """The Markdown twin of :func:`render_compare_html`; images are referenced as ``<stem>.png`` beside it."""
    figures = compare_figures(data) if figures is None else figures
    lines = [f"# {_title(data)}", ""]
    lines += [f"- run {i}: `{r.run_id}` ({r.config.get('method', '?')} on {r.config.get('dataset', '?')})" for i, r in enumerate(data.runs)]
    lines += [""] + [f"_{n}_" for n in data.notes]
    lines += ["", "## Comparison (test split, last evaluated stage of each run)", "",
              markdown_table(comparison_table(data.runs).rename(columns=SHORT_NAMES)),
              "NME in % of the dataset's normaliser; protocol: how the regressors were fitted; box: the normalising box.", "",
              "## Plots", ""]
    for stem, caption, _ in figures:
        lines += [f"![{caption}]({stem}.png)", "", f"_{caption}_", ""]
    lines += ["## Runs", ""]
    for r in data.runs:
        lines += [f"### {r.run_id}", "", markdown_table(pd.DataFrame([(k, _short_md(v)) for k, v in flatten(r.config)], columns=["setting", "value"])), ""]
    return "\n".join(lines)


def _short_md(value: Any) -> str:
    import json

    return json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else fmt(value)

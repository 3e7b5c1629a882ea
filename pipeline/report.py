"""A run's report as one self-contained HTML page: tables in, HTML text out.

Everything the page shows arrives in a :class:`ReportData` (plain dicts, DataFrames
and PNG bytes); nothing here knows where a run keeps its files (``flows.report``
reads them). Plots are drawn with matplotlib and embedded as base64 PNGs, so the
page is one file that can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# The summary columns, in this order, when the run has them (test split, mean over repeats).
HEADLINE_METRICS = (
    "nme_forward",
    "nme_backward",
    "acc0.2_hungarian",
    "nme_forward_nofallback",
    "nme_backward_nofallback",
    "acc0.2_hungarian_nofallback",
    "fallback_fraction",
    "ced_auc10_forward",
    "ced_auc10_backward",
)
# Shorter column titles for the summary table (the metric names are in the full table below it).
SHORT_NAMES = {
    "nme_forward": "NME fwd", "nme_backward": "NME bwd", "acc0.2_hungarian": "Hungarian acc",
    "nme_forward_nofallback": "NME fwd, no fallbacks", "nme_backward_nofallback": "NME bwd, no fallbacks",
    "acc0.2_hungarian_nofallback": "Hungarian acc, no fallbacks", "fallback_fraction": "fallback share",
    "ced_auc10_forward": "CED AUC@10 fwd", "ced_auc10_backward": "CED AUC@10 bwd",
}
# Label-free cluster quality (ZeroShot writes them on the train split).
QUALITY_METRICS = ("silhouette", "calinski_harabasz", "kmeans_inertia", "n_points", "n_clusters")
_PER_GT = re.compile(r"^acc(?P<t>[0-9.]+)_gt(?P<l>\d+)_(?P<name>.+)$")


@dataclass
class ReportData:
    """What one run's report shows. ``metrics``: the run's metrics table (all rows);
    ``keypoints``: its keypoints table (for presence / fallback shares), either may be None;
    ``feature_spec``: the feature store's description, or None with ``feature_note`` saying why;
    ``images``: (caption, PNG bytes) of figures the run already wrote (contact sheets, CED)."""

    run_id: str
    config: dict[str, Any]
    metrics: pd.DataFrame | None = None
    keypoints: pd.DataFrame | None = None
    feature_spec: dict[str, Any] | None = None
    feature_note: str = ""
    images: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pose_clusters: pd.DataFrame | None = None  # D-ULD++'s pose analysis (table kind pose_clusters), if the run has one


# ------------------------------------------------------------ tables
def fmt(value: Any) -> str:
    """A metric value as the report prints it: integers plain, other numbers with 3 decimals."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "–"
        if v.is_integer() and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.3f}" if abs(v) >= 1e-3 else f"{v:.3g}"
    return str(value)


def _mean_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[metrics["repeat"] == -1]


def main_protocol_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of one (protocol, box) for the plots: paper / landmarks when present, else the first one."""
    if frame is None or frame.empty or "protocol" not in frame.columns:
        return frame
    pairs = list(dict.fromkeys(zip(frame["protocol"], frame["box"])))
    pick = ("paper", "landmarks") if ("paper", "landmarks") in pairs else pairs[0]
    return frame[(frame["protocol"] == pick[0]) & (frame["box"] == pick[1])]


def _stage_order(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["round", "stage"], kind="stable")


def headline_table(metrics: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (method, stage, round) with the headline metrics of ``split`` as columns."""
    m = _mean_rows(metrics)
    m = m[(m["split"] == split) & m["metric"].isin(HEADLINE_METRICS)]
    if m.empty:
        return pd.DataFrame()
    # A run evaluated under several protocols / box rules gets one row per (stage, protocol, box);
    # the columns appear only then, so a run with one evaluation reads as before.
    index = ["method", "stage", "round"]
    if "protocol" in m.columns and len(m[["protocol", "box"]].drop_duplicates()) > 1:
        index += ["protocol", "box"]
    wide = m.pivot_table(index=index, columns="metric", values="value", aggfunc="last")
    wide = wide[[c for c in HEADLINE_METRICS if c in wide.columns]].reset_index()
    return _stage_order(wide).reset_index(drop=True)


def quality_table(metrics: pd.DataFrame) -> pd.DataFrame:
    m = _mean_rows(metrics)
    m = m[m["metric"].isin(QUALITY_METRICS)]
    return m[["method", "stage", "round", "split", "metric", "value"]].reset_index(drop=True)


def pose_cluster_table(pose: pd.DataFrame) -> pd.DataFrame:
    """One line per (stage, round, split) of a ``pose_clusters`` table: clustering accuracy per pose bin and overall."""
    if pose is None or pose.empty:
        return pd.DataFrame()
    order = pose[["bin_index", "bin"]].drop_duplicates()
    bins = order.assign(at=order["bin_index"].where(order["bin_index"] >= 0, 10**6)).sort_values("at")["bin"].tolist()  # overall (-1) last
    piv = pose.pivot_table(index=["round", "stage", "split"], columns="bin", values="accuracy", aggfunc="first").reset_index()
    return piv[["stage", "round", "split", *[b for b in bins if b in piv.columns]]].sort_values(["round", "split"]).reset_index(drop=True)


def presence_table(keypoints: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    """Per discovered landmark of the run's last round (on ``split``, default every image): share of
    images where it is present, and where it is a fallback (filled in, not detected). Needs no labels."""
    kp = keypoints if split is None else keypoints[keypoints["split"] == split]
    if kp.empty:
        return pd.DataFrame()
    last = kp["round"].max()
    kp = kp[kp["round"] == last]
    kp = kp[kp["stage"] == kp["stage"].iloc[-1]]
    fb = kp["fallback"].astype(bool) if "fallback" in kp.columns else pd.Series(False, index=kp.index)
    out = pd.DataFrame({"landmark_id": kp["landmark_id"], "present": kp["present"].astype(bool), "fallback": fb & kp["present"].astype(bool)})
    g = out.groupby("landmark_id")
    table = pd.DataFrame({"present": g["present"].mean(), "fallback": g["fallback"].mean(), "images": g.size()}).reset_index()
    table.insert(0, "stage", f"{kp['stage'].iloc[-1]} {int(last)}")
    return table


def flip_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per discovered landmark: its partner under a horizontal flip, the flip error and the error under
    small affine warps (``flows.discover``'s ``flip_error_lm<k>`` / ``flip_partner_lm<k>`` /
    ``warp_error_lm<k>`` metrics), when the run has them."""
    m = _mean_rows(metrics)
    rows: dict[int, dict[str, Any]] = {}
    for r in m.itertuples(index=False):
        hit = re.match(r"^(flip_error|flip_partner|warp_error|warp_motion|renoise_error)_lm(\d+)$", str(r.metric))
        if hit:
            rows.setdefault(int(hit[2]), {"landmark_id": int(hit[2])})[hit[1]] = r.value
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame([rows[k] for k in sorted(rows)])
    if "flip_partner" in table.columns:
        table["flip_partner"] = table["flip_partner"].astype(int)
    return table[[c for c in ("landmark_id", "flip_partner", "flip_error", "warp_error", "warp_motion", "renoise_error") if c in table.columns]]


def _html_table(frame: pd.DataFrame, css: str = "") -> str:
    if frame is None or frame.empty:
        return "<p class='note'>none</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)
    )
    return f"<div class='scroll'><table class='{css}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_short(v))}</td></tr>" for k, v in pairs)
    return f"<table class='kv'>{rows}</table>"


def _short(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return fmt(value)


def flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config dicts as ``a.b = value`` pairs (lists stay whole)."""
    out: list[tuple[str, Any]] = []
    for key in sorted(config):
        value = config[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


# ------------------------------------------------------------ plots
def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _figure()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def hungarian_plot(metrics: pd.DataFrame) -> bytes | None:
    """Bars of per-ground-truth-landmark accuracy after Hungarian matching (the paper's Fig. 4),
    one group per (stage, round): the first and the last evaluated ones."""
    m = main_protocol_rows(_mean_rows(metrics))
    m = m[m["split"] == "test"]
    rows = []
    for r in m.itertuples(index=False):
        hit = _PER_GT.match(str(r.metric))
        if hit and not hit["name"].startswith("hungarian"):
            rows.append((r.stage, int(r.round), int(hit["l"]), hit["name"], float(r.value), hit["t"]))
    if not rows:
        return None
    df = pd.DataFrame(rows, columns=["stage", "round", "gt", "name", "acc", "t"])
    groups = _stage_order(df[["stage", "round"]].drop_duplicates())
    keep = [groups.iloc[0]] if len(groups) == 1 else [groups.iloc[0], groups.iloc[-1]]
    plt = _figure()
    gts = sorted(df["gt"].unique())
    names = [df[df["gt"] == g]["name"].iloc[0] for g in gts]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(gts) + 2), 3.6), dpi=110)
    width = 0.8 / len(keep)
    for j, g in enumerate(keep):
        sub = df[(df["stage"] == g["stage"]) & (df["round"] == g["round"])].set_index("gt")["acc"]
        ax.bar(np.arange(len(gts)) + (j - (len(keep) - 1) / 2) * width, [sub.get(x, np.nan) for x in gts], width,
               label=f"{g['stage']} {int(g['round'])}")
    ax.set_xticks(np.arange(len(gts)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"accuracy at {df['t'].iloc[0]} x normaliser")
    ax.set_title("per ground-truth landmark, after Hungarian matching (test)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def rounds_plot(metrics: pd.DataFrame) -> bytes | None:
    """Forward / backward NME (and without fallbacks) against the round, for runs with several rounds."""
    table = headline_table(main_protocol_rows(metrics))
    nme = [c for c in ("nme_forward", "nme_backward") if c in table.columns and table[c].notna().any()]
    if table.empty or table["round"].nunique() < 2 or not nme:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for col, style, colour in (("nme_forward", "-o", "C0"), ("nme_backward", "-s", "C1"),
                               ("nme_forward_nofallback", "--o", "C0"), ("nme_backward_nofallback", "--s", "C1")):
        if col in table.columns and table[col].notna().any():
            ax.plot(table["round"], table[col], style, color=colour, label=col, alpha=1.0 if "nofallback" not in col else 0.6)
    ax.set_xlabel("round (0 = bootstrap)")
    ax.set_ylabel("NME (% of normaliser)")
    ax.set_xticks(sorted(table["round"].unique()))
    ax.set_title("NME per round (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def yaw_plot(metrics: pd.DataFrame) -> bytes | None:
    """Forward / backward NME per yaw bin (``nme_<direction>_yaw<bin>`` metrics) of the last evaluated stage."""
    m = main_protocol_rows(_mean_rows(metrics))
    m = m[(m["split"] == "test") & m["metric"].str.match(r"^nme_(forward|backward)_yaw")]
    if m.empty:
        return None
    last = _stage_order(m[["stage", "round"]].drop_duplicates()).iloc[-1]
    m = m[(m["stage"] == last["stage"]) & (m["round"] == last["round"])]
    parsed = m["metric"].str.extract(r"^nme_(?P<direction>forward|backward)_yaw(?P<bin>.+)$")
    m = m.assign(direction=parsed["direction"].to_numpy(), bin=parsed["bin"].to_numpy())
    bins = list(dict.fromkeys(m["bin"]))  # in the order the evaluator wrote them (yaw ascending)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for j, direction in enumerate(("forward", "backward")):
        sub = m[m["direction"] == direction].set_index("bin")["value"]
        ax.bar(np.arange(len(bins)) + (j - 0.5) * 0.4, [sub.get(b, np.nan) for b in bins], 0.4, label=f"NME {direction}")
    ax.set_xticks(np.arange(len(bins)))
    ax.set_xticklabels(bins, fontsize=8)
    ax.set_xlabel("yaw bin (degrees)")
    ax.set_ylabel("NME (% of normaliser)")
    ax.set_title(f"NME per yaw bin ({last['stage']} {int(last['round'])}, test)")
    ax.grid(axis="y", alpha=0.3)
    top = np.nanmax(m["value"].to_numpy(np.float64)) if np.isfinite(m["value"].to_numpy(np.float64)).any() else 1.0
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    return _png(fig)


def presence_plot(presence: pd.DataFrame) -> bytes | None:
    """Stacked bars per discovered landmark: detected share and fallback share of the images."""
    if presence is None or presence.empty:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(presence) + 2), 3.2), dpi=110)
    x = presence["landmark_id"].to_numpy()
    detected = (presence["present"] - presence["fallback"]).to_numpy()
    ax.bar(x, detected, label="detected")
    ax.bar(x, presence["fallback"].to_numpy(), bottom=detected, label="fallback (filled in)", color="#bbb")
    ax.set_xticks(x)
    ax.set_xlabel("discovered landmark")
    ax.set_ylabel("share of images")
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title("landmark presence (no labels needed)")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return _png(fig)


# ------------------------------------------------------------ page
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}table.kv th{text-align:left}table.kv td{text-align:left;font-family:monospace}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{color:#777;font-style:italic}.scroll{overflow-x:auto}.figs{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}
.thumbs img{width:220px}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
"""


def _img(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = html.escape(caption)
    return f"<figure><img alt='{cap}' src='data:image/png;base64,{data}'><figcaption>{cap}</figcaption></figure>"


def render_html(data: ReportData) -> str:
    """The whole report page (one string, images inlined)."""
    cfg = data.config
    method = str(cfg.get("method", "?"))
    title = f"uld report: {data.run_id}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append(_kv_table([("method", method), ("dataset", cfg.get("dataset", "?")), ("backbone", cfg.get("backbone", "?"))]))
    for note in data.notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")

    parts.append("<h2>Results (test split, mean over regressor repeats)</h2>")
    metrics = data.metrics
    if metrics is None or metrics.empty:
        parts.append("<p class='note'>no metrics.parquet: the run was not evaluated (`uld evaluate --run RUN`)</p>")
    else:
        headline = headline_table(metrics)
        if headline.empty:
            parts.append("<p class='note'>no ground-truth scores (a dataset without labels, or not evaluated): "
                         "see the label-free measures below</p>")
        else:
            parts.append(_html_table(headline.rename(columns=SHORT_NAMES), "metrics"))
        if "nme_forward" in headline.columns:
            parts.append("<p class='note'>NME (nme_forward / nme_backward) in % of the dataset's normaliser; Hungarian acc "
                         "(acc0.2_hungarian): share of ground-truth landmarks within 0.2 of it after matching; no fallbacks: "
                         "fallback landmarks counted as missing; fallback share: test landmarks filled in rather than detected.</p>")
        quality = quality_table(metrics)
        if not quality.empty:
            parts.append("<h2>Cluster quality (training descriptors)</h2>" + _html_table(quality))
    flips = flip_table(metrics) if metrics is not None and not metrics.empty else pd.DataFrame()
    if not flips.empty:
        mean = _mean_rows(metrics)
        overall = mean.loc[mean["metric"] == "flip_error", "value"]
        warped = mean.loc[mean["metric"] == "warp_error", "value"]
        motion = mean.loc[mean["metric"] == "warp_motion", "value"]
        floor = mean.loc[mean["metric"] == "renoise_error", "value"]
        what = " and ".join(w for w, have in (("a horizontal flip", "flip_error" in flips), ("small affine warps", "warp_error" in flips)) if have)
        parts.append(f"<h2>Consistency under {what} (no labels needed)</h2>")
        means = [f"mean {name} error: <b>{html.escape(fmt(v.iloc[-1]))}</b> %" for name, v in (("flip", overall), ("warp", warped)) if len(v)]
        if len(motion):
            means.append(f"the warp moved the landmarks by {html.escape(fmt(motion.iloc[-1]))} %")
        if means:
            parts.append("<p>" + "; ".join(means) + " of sqrt(w*h) of the object box"
                         + (f"; noise floor (same images, other diffusion noise): {html.escape(fmt(floor.iloc[-1]))} %" if len(floor) else "")
                         + "</p>")
        parts.append(_html_table(flips) + "<p class='note'>Landmarks found on the mirror image (flip) or on a seeded small affine "
                     "warp of the image (rotation, scale, shift; warp), mapped back, against the "
                     "original's; flip_partner is the landmark a landmark becomes when mirrored (a left-eye landmark "
                     "should become the right-eye one), found by Hungarian matching; renoise_error: how far the landmark moves when the same image is "
                     "encoded with other diffusion noise (the floor a flip or warp error can reach with these features); warp_motion: "
                     "how far the warp moved the landmark (the warp error of a landmark that stays put).</p>")
    presence = presence_table(data.keypoints) if data.keypoints is not None and not data.keypoints.empty else pd.DataFrame()
    if not presence.empty:
        parts.append("<h2>Landmark presence per discovered landmark (every image, last round)</h2>" + _html_table(presence))

    plots = []
    if metrics is not None and not metrics.empty:
        plots += [("NME per round", rounds_plot(metrics)), ("per-landmark Hungarian accuracy", hungarian_plot(metrics)),
                  ("NME per yaw bin", yaw_plot(metrics))]
    plots.append(("landmark presence", presence_plot(presence)))
    plots = [(c, p) for c, p in plots if p is not None]
    if plots:
        parts.append("<h2>Plots</h2><div class='figs'>" + "".join(_img(c, p) for c, p in plots) + "</div>")
    pose = pose_cluster_table(data.pose_clusters) if data.pose_clusters is not None else pd.DataFrame()
    if not pose.empty:
        src = str(data.pose_clusters["pose_source"].iloc[0])
        parts.append("<h2>Pose clusters against known poses (paper 001, Fig. 7)</h2>" + _html_table(pose)
                     + f"<p class='note'>Each of the Q = {int(data.pose_clusters['q'].iloc[0])} pose clusters mapped to the "
                     f"{'yaw bin' if src == 'yaw' else 'pose class'} most of its train images are in; accuracy: the share of a bin's "
                     "images whose cluster maps to it (test images scored with the train mapping). Plot: figures/pose-clusters.png.</p>")
    if data.images:
        sheets = [(c, p) for c, p in data.images if c.endswith("-landmarks.png")]
        overlays = [(c, p) for c, p in data.images if "/overlays/" in c]
        others = [(c, p) for c, p in data.images if (c, p) not in sheets and (c, p) not in overlays]
        parts.append("<h2>Figures written by the run</h2>" + "".join(_img(c, p) for c, p in sheets)
                     + "<div class='figs'>" + "".join(_img(c, p) for c, p in others) + "</div>")
        if overlays:
            parts.append("<h3>Per-image overlays (same landmark, same colour)</h3><div class='figs thumbs'>"
                         + "".join(_img(c, p) for c, p in overlays) + "</div>")

    parts.append("<h2>Features</h2>")
    if data.feature_spec:
        parts.append(_kv_table(flatten(data.feature_spec)))
    if data.feature_note:
        parts.append(f"<p class='note'>{html.escape(data.feature_note)}</p>")
    parts.append("<h2>Configuration</h2>" + _kv_table(flatten(cfg)))
    if metrics is not None and not metrics.empty:
        full = _mean_rows(metrics)[["stage", "round", "split", "metric", "value", "k", "n_regressor_images"]
                                   + [c for c in ("protocol", "box") if c in metrics.columns]]
        parts.append(f"<details><summary>all {len(full)} metric rows (means)</summary>{_html_table(full)}</details>")
    parts.append("</body></html>\n")
    return "".join(parts)

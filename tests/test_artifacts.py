"""Round artifacts: the NME-per-round table and the round's markdown, published inside a tiny flow."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pandas as pd
import pyarrow as pa

from flows.artifacts import artifact_key, nme_table, publish_round_artifacts, round_files
from storage.layout import Workspace
from storage.tables import SCHEMAS, write_table

RUN = "tiny_Run.1"


def _frame(kind: str, rows: list[dict]) -> pd.DataFrame:
    """Rows of table ``kind`` with every schema column (unset ones zero / empty)."""
    schema = SCHEMAS[kind]
    out = {}
    for f in schema:
        default = "" if pa.types.is_string(f.type) else (False if pa.types.is_boolean(f.type) else 0)
        out[f.name] = [r.get(f.name, default) for r in rows]
    return pd.DataFrame(out)


def _tiny_run(home) -> None:
    ws = Workspace(home)
    ws.run_dir(RUN).mkdir(parents=True)
    metrics = []
    for stage, rnd, fwd in (("bootstrap", 0, 12.0), ("round", 1, 8.0), ("round", 2, 7.5)):
        for repeat, value in ((0, fwd - 1), (1, fwd + 1), (-1, fwd)):
            metrics.append({"run_id": RUN, "method": "duld", "stage": stage, "round": rnd, "split": "test", "metric": "nme_forward",
                            "value": value, "repeat": repeat, "protocol": "paper", "box": "landmarks"})
        metrics.append({"run_id": RUN, "method": "duld", "stage": stage, "round": rnd, "split": "train", "metric": "nme_forward",
                        "value": 99.0, "repeat": -1, "protocol": "paper", "box": "landmarks"})
        metrics.append({"run_id": RUN, "method": "duld", "stage": stage, "round": rnd, "split": "test", "metric": "nme_backward",
                        "value": 2 * fwd, "repeat": -1, "protocol": "paper", "box": "landmarks"})
    write_table(_frame("metrics", metrics), ws.run_file(RUN, "metrics.parquet"), "metrics")
    kp = [{"run_id": RUN, "method": "duld", "stage": "round", "round": r, "split": "test", "image_id": f"im{i}", "landmark_id": 0,
           "x": 1.0, "y": 2.0, "present": True} for r in (1, 2) for i in range(3)]
    write_table(_frame("keypoints", kp), ws.run_file(RUN, "keypoints.parquet"), "keypoints")


def test_table_uses_summary_rows_of_the_test_split_and_files_count_the_rounds_rows(tmp_path):
    _tiny_run(tmp_path)
    from storage.tables import read_table

    table = nme_table(read_table(Workspace(tmp_path).run_file(RUN, "metrics.parquet"), "metrics"))
    assert [(r["stage"], r["round"], r["nme_forward"], r["nme_backward"]) for r in table] == [
        ("bootstrap", 0, 12.0, 24.0), ("round", 1, 8.0, 16.0), ("round", 2, 7.5, 15.0)]
    files = round_files(tmp_path, RUN, "round", 2)
    assert {k.rsplit("/", 1)[-1]: v for k, v in files.items()} == {"keypoints.parquet": 3, "metrics.parquet": 5}
    assert artifact_key(RUN, "round", 2) == "tiny-run-1-round-2"


def test_published_inside_a_flow_and_readable_from_the_server(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.settings import get_current_settings

    _tiny_run(tmp_path)
    assert publish_round_artifacts(tmp_path, RUN, "round", 2) is None  # no flow run: nothing to attach to

    @flow(name="round-2")
    def tiny_round():
        return publish_round_artifacts(tmp_path, RUN, "round", 2)

    got = tiny_round()
    assert got is not None and len(got.table) == 3

    def read(key):
        # Plain REST (this client version sends nulls the server's filter schema refuses).
        body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "limit": 10, "offset": 0, "sort": "CREATED_DESC"}).encode()
        url = f"{get_current_settings().api.url}/artifacts/filter"
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    table = read("tiny-run-1-nme")
    md = read("tiny-run-1-round-2")
    assert len(table) == 1 and table[0]["type"] == "table" and table[0]["id"] == str(got.table_id)
    assert "7.5" in str(table[0]["data"]) and "12.0" in str(table[0]["data"])
    assert md[0]["type"] == "markdown" and "keypoints.parquet" in md[0]["data"] and "(3 rows of this round)" in md[0]["data"]
    assert np.isclose(got.table[-1]["nme_forward"], 7.5)

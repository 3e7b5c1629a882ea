"""The README's Python examples run, so they cannot rot.

The ```python blocks of the "Outputs" section (pandas over the run tables) and
of "Landmarks for new images" (the predictor API) are executed against a tiny
workspace (tests/tiny_runs.py), from the directory holding it, so the README's
``glob.glob("workspace/runs/*/...")`` finds it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

pytest.importorskip("faiss")

from tiny_runs import tiny_runs  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
# What each section's output must show when the tiny workspace's runs are read.
SECTIONS = {"Outputs": ("nme_forward", "zeroshot", "duld"), "Landmarks for new images": ("test_",)}


def python_blocks(text: str, section: str) -> list[str]:
    """The ```python blocks of the README's ``## <section>`` (up to the next ``## `` heading)."""
    m = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if m is None:
        return []
    return re.findall(r"^```python\n(.*?)^```", m.group(1), flags=re.M | re.S)


def test_block_extraction_sees_only_the_section():
    text = "## A\n```python\nx = 1\n```\n## B\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text, "A") == ["x = 1\n"]
    assert python_blocks(text, "B") == ["y = 2\n"]
    assert python_blocks(text, "C") == []


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_python_blocks_run_on_a_tiny_workspace(section, tmp_path_factory, prefect_harness, monkeypatch):
    blocks = python_blocks(README.read_text(), section)
    assert blocks, f"README section {section!r} has no python block (renamed?)"
    runs = tiny_runs(tmp_path_factory)
    monkeypatch.chdir(runs.home.parent)  # the README reads workspace/... relative to here
    out = io.StringIO()
    for code in blocks:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md ({section})", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue()
    for word in SECTIONS[section]:
        assert word in printed, f"the README's {section!r} code did not show {word!r}:\n{printed}"

"""The examples run as shipped, and the API reference builds from the docstrings (pdoc) with a page for every
public module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_MODULES = ["ssl_lightning", "ssl_lightning.callback", "ssl_lightning.methods", "ssl_lightning.groups",
               "ssl_lightning.penalty", "ssl_lightning.schedules", "ssl_lightning.graph", "ssl_lightning.compaction",
               "ssl_lightning.ops", "ssl_lightning.report", "ssl_lightning.data", "ssl_lightning.models",
               "ssl_lightning.pipeline"]  # fmt: skip


def test_own_lightning_module_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_lightning_module.py"), "--epochs", "3", "--limit-batches", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val acc" in done.stdout and "channels kept: features.0 32 ->" in done.stdout
    assert "| **model** |" in done.stdout  # the compaction report
    assert not (tmp_path / "lightning_logs").exists()


def test_api_reference_builds_with_a_page_per_public_module(tmp_path: Path) -> None:
    pdoc = pytest.importorskip("pdoc")
    pdoc.pdoc(*API_MODULES, output_directory=tmp_path)
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for module in API_MODULES:
        assert module.replace(".", "/") + ".html" in pages, sorted(pages)
    callback_page = (tmp_path / "ssl_lightning" / "methods.html").read_text()
    assert "StructuredSparsity" in callback_page and "ParameterizedPruning" in callback_page

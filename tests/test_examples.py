"""The quick start's text: two disjoint, nearly equal halves of Python's own documentation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sample_text.py"


def test_sample_text_writes_two_disjoint_halves(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sample")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calib = (tmp_path / "sample" / "calib.txt").read_text(encoding="utf-8")
    evaluation = (tmp_path / "sample" / "eval.txt").read_text(encoding="utf-8")
    assert len(calib) > 100_000 and len(evaluation) > 100_000  # 64 windows of 512 tokens need ~150,000
    assert abs(len(calib) - len(evaluation)) < 0.1 * len(calib)
    calib_paragraphs = {p for p in calib.split("\n\n") if len(p) > 200}
    shared = [p for p in evaluation.split("\n\n") if p in calib_paragraphs]
    assert not shared, shared[0][:200]

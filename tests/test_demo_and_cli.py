"""The built-in demo learns, and the CLI runs it."""

import json
import subprocess
import sys

import pytest

from qformer.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_learns_to_caption(tmp_path):
    lines = []
    summary = run_demo(DemoConfig(steps=80, out_dir=str(tmp_path)), log=lines.append)
    assert summary["first_loss"] > 5 and summary["final_loss"] < 2.0
    # far above chance (1/12) on the scenes it trained on; a broken mask or cache fails this
    assert summary["train_exact_match"] >= 0.9
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    assert any("exact-match captions" in line for line in lines)


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "qformer", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "qformer", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr

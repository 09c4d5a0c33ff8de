"""A new user's first hour with the ``qformer`` command (issue #27): a typo is named with the
option or command it nearly is, never silently taken for another option; a recipe that is not
there is "not found"; and a hub id downloads as in transformers, the hub online unless
``HF_HUB_OFFLINE`` says otherwise. Each runs the command as a user does, in a child process."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qformer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def qformer(*arguments: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qformer", *arguments], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("arguments, said, meant", [
    (["captoin", "cat.jpg"], "invalid choice: 'captoin'", "caption"),
    (["--log-level", "debg", "demo"], "invalid choice: 'debg'", "debug"),
])
def test_a_mistyped_command_or_choice_is_named_with_the_close_one(arguments, said, meant):
    result = qformer(*arguments)
    assert result.returncode == 2
    assert said in last_line(result) and last_line(result).endswith(f"; did you mean '{meant}'?")


@pytest.mark.parametrize("arguments, said", [
    # --model is required: argparse reported only that it was missing, hiding the typo
    (["caption", "--modle", "m", "cat.jpg"], "unrecognized arguments: --modle; did you mean --model?"),
    (["caption", "--model", "m", "--jsn", "cat.jpg"], "unrecognized arguments: --jsn; did you mean --json?"),
    (["--log-levl", "debug", "demo"], "unrecognized arguments: --log-levl; did you mean --log-level?"),
])
def test_a_mistyped_option_is_named_with_the_close_one(arguments, said):
    result = qformer(*arguments)
    assert result.returncode == 2
    assert said in last_line(result)


@pytest.mark.parametrize("arguments, said", [
    # abbreviations let a typo through: --resum was taken as --resume, --num-beam as --num-beams
    (["train", "configs/tiny.yaml", "--resum"], "unrecognized arguments: --resum; did you mean --resume?"),
    (["caption", "--model", "m", "--num-beam", "3", "cat.jpg"],
     "unrecognized arguments: --num-beam; did you mean --num-beams?"),
])
def test_an_abbreviated_option_is_refused(arguments, said):
    result = qformer(*arguments, cwd=ROOT)
    assert result.returncode == 2
    assert said in last_line(result)


def test_no_parser_takes_abbreviations():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("qformer", parser), *commands.choices.items()]:
        assert sub.allow_abbrev is False, name


def test_a_recipe_override_is_not_taken_for_a_typo():
    """``--model.bert`` nearly names eval's ``--model``: a dotted word is an override."""
    _, extras = build_parser().parse_known_args(["eval", "runs/x", "--model.llm", "x", "--steps", "2"])
    assert extras == ["--model.llm", "x", "--steps", "2"]


def test_a_missing_recipe_is_not_found(tmp_path):
    result = qformer("train", "stage1.yml", cwd=tmp_path)
    assert result.returncode == 1
    assert last_line(result) == "qformer train: stage1.yml not found: give a recipe (YAML), or with --resume a run folder"


def test_the_command_downloads_hub_ids_unless_told_offline(tmp_path):
    """The hub online by default, as transformers: no "offline" in the error of a download that
    fails (the hub address here refuses connections), and the id named with what to do. With
    ``HF_HUB_OFFLINE=1``, as the tests and CI set it, the offline message."""
    online = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    online["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = qformer("caption", "--model", "Salesforce/blip2-opt-2.7b", "cat.jpg", env=online, cwd=tmp_path)
    assert result.returncode == 1
    line = last_line(result)
    assert "offline" not in line.lower(), line
    assert line == ("qformer caption: Salesforce/blip2-opt-2.7b is not a local directory, and as a hub id it could "
                    "not be downloaded (the hub did not answer) nor found in the local cache: check the "
                    "connection, or point to a local directory")
    offline = qformer("caption", "--model", "Salesforce/blip2-opt-2.7b", "cat.jpg", cwd=tmp_path)
    assert "HF_HUB_OFFLINE is set" in last_line(offline)

"""The ``qformer`` command as a person meets it: fast help, options that explain themselves,
and one line (no traceback) for their mistakes."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qformer import __version__
from qformer.cli import _one_line, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "caption", "vqa", "train", "eval", "export", "convert", "shards")


def qformer(*arguments: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qformer", *arguments], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_help_imports_neither_torch_nor_transformers():
    """What makes ``qformer --help`` answer at once (and HF_HUB_OFFLINE count): nothing heavy
    is imported before a command runs."""
    code = ("import sys\nfrom qformer.cli import main\nfor argv in (['--help'], ['train', '--help'], "
            "['convert', '--help'], ['shards', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    for command in COMMANDS:
        assert command in out.stdout


def test_version_and_unknown_command():
    assert qformer("--version").stdout.strip() == f"qformer {__version__}"
    bad = qformer("nonsense")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_every_option_explains_itself():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) <= set(commands.choices)
    for name, sub in [("qformer", parser), *commands.choices.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        for action in sub._actions:  # a default worth stating is stated
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and not isinstance(action, argparse._HelpAction):
                assert f"default: {action.default}" in " ".join(text.split()), (name, action.dest)


def test_offline_hub_id_fails_at_once_naming_the_recipe_key(tmp_path):
    """The first training command of docs/training.md on a machine without bert-base-uncased: one line
    naming model.bert and how to point it at a directory, no retries, no traceback. Offline as
    docs/checkpoints.md shows it: set, as the tests and CI set it (the command's default is online)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "a.png")
    (tmp_path / "captions.json").write_text('[{"image": "a.png", "caption": "a square"}]')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    env["HF_HUB_OFFLINE"] = "1"
    out = qformer("train", str(ROOT / "configs" / "stage1.yaml"), "--data.path", "captions.json",
                  "--data.image_root", "images/", "--data.num_workers", "0", "--output_dir", "run",
                  env=env, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith("qformer train: model.bert: 'bert-base-uncased'")
    assert "--model.bert /path/to/model" in line and "HF_HUB_OFFLINE=0" in line


@pytest.mark.parametrize("arguments, message", [
    (["train", "configs/tiny.yaml", "--device", "cuda"], "device cuda: CUDA is not available on this machine"),
    (["train", "configs/tiny.yaml", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "configs/tiny.yaml", "--data.source", "captions", "--data.path", "nope.json"],
     "data.path: nope.json is not a file"),
    (["caption", "--model", "nowhere", "x.png"], "nowhere is not a local directory"),
    (["export", "nowhere", "out"], "nowhere not found"),
])
def test_mistakes_are_one_line(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    arguments = [a.replace("configs/", str(ROOT / "configs") + "/") for a in arguments]
    with pytest.raises(SystemExit) as stop:
        main([*arguments, *(["--output_dir", str(tmp_path / "run")] if arguments[0] == "train" else [])])
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error


def test_debug_shows_the_traceback(tmp_path):
    out = qformer("--debug", "export", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert out.returncode == 1 and "Traceback" in out.stderr and "FileNotFoundError" in out.stderr


def test_a_missing_package_is_named():
    assert _one_line(ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")) == (
        "this needs the bitsandbytes package, which is not installed (pip install it)")


def test_train_help_lists_every_recipe_and_the_overrides():
    text = qformer("train", "--help").stdout
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        assert recipe.name in text, recipe.name
    assert "--section.key value" in text and "final/" in text


def test_a_directory_holding_no_model_fails_alike_for_every_command(tmp_path, capsys):
    """caption, vqa, retrieve, eval --model, serve and export on a directory with no config.json,
    and on one whose config.json is another model's: one line, the same words whatever the
    command, and nothing loads."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    expected = {
        "empty": f"{tmp_path / 'empty'} holds no config.json: expected a model directory (",
        "bert": f"{tmp_path / 'bert'}: config.json (model_type 'bert') is not a stage-1 BLIP-2 model, a BLIP-2 or an "
                "InstructBLIP: expected a model directory (",
    }
    for name, start in expected.items():
        model = str(tmp_path / name)
        commands = {
            "caption": ["caption", "--model", model, "x.png", "--device", "cpu"],
            "vqa": ["vqa", "--model", model, "--question", "what is it?", "x.png", "--device", "cpu"],
            "retrieve": ["retrieve", "--model", model, "--images", str(tmp_path), "--query", "x", "--device", "cpu"],
            "eval": ["eval", "--model", model, "--task", "vqav2", "--data", str(tmp_path), "--device", "cpu"],
            "serve": ["serve", "--model", model, "--device", "cpu"],
            "export": ["export", model, str(tmp_path / "out")],
        }
        messages = {}
        for command, arguments in commands.items():
            with pytest.raises(SystemExit) as stop:
                main(arguments)
            captured = capsys.readouterr()
            assert stop.value.code == 1 and "Traceback" not in captured.err, (command, captured.err)
            assert captured.err.count("\n") == 1 and captured.err.startswith(f"qformer {command}: "), captured.err
            messages[command] = captured.err.removeprefix(f"qformer {command}: ")
        assert len(set(messages.values())) == 1, messages
        assert messages["caption"].startswith(start), messages["caption"]
    assert not (tmp_path / "out").exists()

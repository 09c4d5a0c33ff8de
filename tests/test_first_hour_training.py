"""A new user's first hour with ``qformer train`` (issue #27): a failed run does not block its
corrected rerun, YAML mistakes are one line naming where they are, a tiny stage-2 recipe runs in
seconds, a recipe's loader workers fit the machine, and the resume, Ctrl-C, --help and --device
messages say what they mean, once."""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from qformer.cli import main
from qformer.train.config import SAFE_ON_RESUME, load_train_config
from test_train import ROOT, TINY
from test_train_runs import ENV, QFORMER, one_line_error, wait_for_metrics

CONFIGS = ROOT / "configs"


def qformer_in(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """``qformer ARGS`` run in ``cwd``, where a recipe's relative paths (runs/..., data/...) land."""
    return subprocess.run(QFORMER + [str(a) for a in args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("recipe, extra", [
    ("stage1.yaml", []),
    ("stage2_opt.yaml", ["--model.init_from", "runs/tiny/final", "--model.language_model", "minilm"]),
])
def test_a_run_refused_for_its_data_writes_nothing(tmp_path, recipe, extra):
    failed = qformer_in(tmp_path, "train", CONFIGS / recipe, *extra)
    one_line_error(failed, "train", "data.path: data/captions.json is not a file")
    assert not (tmp_path / "runs").exists()  # so the corrected command is not refused as a rerun


def test_a_folder_holding_only_a_config_is_replaced_without_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TINY.read_text())  # what a run that failed while it was built leaves
    result = qformer_in(tmp_path, "train", TINY, "--output_dir", run, "--steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{run} holds only the config.yaml of a run that never trained a step: replacing it" in result.stderr
    assert (run / "final").is_dir()


@pytest.mark.parametrize("recipe_text, override, message", [
    ("model:\n  stage: stage1\ndata:\n  source: scenes\n  image_size: 32: 3\n", [],
     "recipe.yaml: not valid YAML: line 5, column 17: mapping values are not allowed here"),
    (TINY.read_text(), ["--optim.betas", "[0.9, 0.999"],
     "override --optim.betas '[0.9, 0.999' is not a YAML value (line 1, column 12: expected ',' or ']'"),
    ("- a list\n- not a recipe\n", [], "recipe.yaml: a recipe is a YAML mapping (model:, data:, ...), got a list"),
])
def test_yaml_mistakes_are_one_line_naming_where(tmp_path, recipe_text, override, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    result = qformer_in(tmp_path, "train", recipe, *override)
    one_line_error(result, "train", message)
    assert len(result.stderr.strip().splitlines()) == 1


def qformer_here(cwd: Path, *args: object) -> SystemExit | None:
    """``qformer ARGS`` run in this process, in ``cwd``: the SystemExit of a command that failed,
    None when it returned (exit status 0); a bug's exception fails the test."""
    before = os.getcwd()
    os.chdir(cwd)
    try:
        main([str(a) for a in args])
    except SystemExit as err:
        return err
    finally:
        os.chdir(before)
    return None


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> tuple[Path, SystemExit | None]:
    """A folder where ``configs/tiny.yaml`` then ``configs/tiny_stage2.yaml`` have run (short), as
    the commands run them in that folder (in this process: the tests below read what they leave)."""
    cwd = tmp_path_factory.mktemp("first_hour")
    stage1 = qformer_here(cwd, "train", TINY, "--steps", "1", "--save_every", "1")
    assert stage1 is None, repr(stage1)
    return cwd, qformer_here(cwd, "train", CONFIGS / "tiny_stage2.yaml", "--steps", "2")


def test_tiny_stage2_recipe_runs_from_the_tiny_stage1(tiny_runs, capsys):
    cwd, stage2 = tiny_runs
    assert stage2 is None, repr(stage2)
    run = cwd / "runs" / "tiny_stage2"
    assert (run / "final" / "config.json").is_file() and (run / "step_0000002").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["language_model"] == "minilm"
    Image.new("RGB", (40, 30), "red").save(cwd / "red.png")
    for command in (["caption"], ["vqa", "--question", "what colour is it?"]):  # the model it leaves works
        capsys.readouterr()
        used = qformer_here(cwd, *command, "--model", "runs/tiny_stage2", "--max-new-tokens", "3", "red.png")
        out = capsys.readouterr()
        assert used is None and out.out.startswith("red.png\t"), (repr(used), out.err[-2000:])


def test_resuming_a_finished_run_says_so(tiny_runs):
    cwd, _ = tiny_runs
    result = qformer_in(cwd, "train", "runs/tiny_stage2", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "runs/tiny_stage2 is finished at step 2: nothing to do" in result.stderr
    assert '"finished": true' in result.stdout and '"step": 2' in result.stdout


def test_a_recipes_workers_fit_the_machine(tmp_path):
    from qformer.train.config import available_cpus

    values = yaml.safe_load(TINY.read_text())
    values["data"]["num_workers"] = available_cpus() + 6
    recipe = tmp_path / "many_workers.yaml"
    recipe.write_text(yaml.safe_dump(values))
    run = tmp_path / "run"
    result = qformer_in(tmp_path, "train", recipe, "--output_dir", run, "--steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    cpus = available_cpus()
    assert f"data.num_workers {cpus + 6} -> {cpus}" in result.stderr
    assert "suggested max number of worker" not in result.stderr  # torch's own warning
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["num_workers"] == cpus


def test_workers_given_on_the_command_line_are_kept(tmp_path):
    from qformer.train.config import available_cpus, fit_workers

    overrides = ["--data.num_workers", str(available_cpus() + 6), "--output_dir", str(tmp_path)]
    config = load_train_config(TINY, overrides)
    fit_workers(config, overrides)
    assert config.data.num_workers == available_cpus() + 6


def test_ctrl_c_says_a_save_is_pending_and_the_stop_line_is_printed_once(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(QFORMER + ["train", str(TINY), "--output_dir", str(run), "--steps", "200",
                                          "--save_every", "1000"],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metrics(process, run)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGINT, err[-2000:]
    assert ("SIGINT: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at once "
            "without saving)") in err
    assert len(re.findall(r"stopped by SIGINT after step \d+", err)) == 1, err[-2000:]


def test_train_help_lists_every_key_resume_may_change():
    result = subprocess.run(QFORMER + ["train", "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    missing = [key for key in sorted(SAFE_ON_RESUME - {"output_dir"}) if not re.search(rf"\b{re.escape(key)}\b", text)]
    assert not missing, missing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_clean_line(tmp_path):
    result = qformer_in(tmp_path, "train", TINY, "--output_dir", tmp_path / "run", "--device", "cuda")
    one_line_error(result, "train", f"device cuda: CUDA is not available on this machine (torch {torch.__version__})")
    assert "device: device" not in result.stderr and not (tmp_path / "run").exists()


"""Runs that are safe to stop, resume and rerun: resume with the run's own config (safe changes
recorded, others refused), a used run folder refused unless --resume or --overwrite, SIGINT /
SIGTERM / SIGUSR1 saving a checkpoint and exiting 128 + the signal, `qformer eval` from the run
folder alone, checked recipe values, clean metric names, curve panels and the run's logging."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qformer.cli import main
from qformer.train.config import DataSpec, load_train_config
from qformer.train.loop import train
from qformer.train.plots import panels
from qformer.train.signals import STOP_SIGNALS
from test_train import TINY, tiny, weights

QFORMER = [sys.executable, "-m", "qformer"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def qformer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(QFORMER + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit status 1, no traceback, and one stderr line naming the problem."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"qformer {command}: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def cli_error(capsys, command: str, *args: object) -> str:
    """The one stderr line of an in-process ``qformer`` run that exits 1."""
    capsys.readouterr()  # what ran before
    with pytest.raises(SystemExit) as exit:
        main([command, *map(str, args)])
    assert exit.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qformer {command}: "), lines
    return lines[0]


@pytest.mark.parametrize("override, message", [
    (["--data.batch_size", "0"], "data.batch_size must be at least 1, got 0"),
    (["--data.eval_batch_size", "0"], "data.eval_batch_size must be at least 1, got 0"),
    (["--data.num_workers", "-1"], "data.num_workers must be at least 0, got -1"),
    (["--data.image_size", "0"], "data.image_size must be at least 1, got 0"),
    (["--data.max_text_length", "0"], "data.max_text_length must be at least 1, got 0"),
    (["--data.max_image_pixels", "0"], "data.max_image_pixels must be at least 1, got 0"),
    (["--data.max_unreadable", "1.5"], "data.max_unreadable must be a fraction from 0 to 1, got 1.5"),
    (["--save_every", "0"], "save_every must be at least 1, got 0"),
    (["--log_every", "0"], "log_every must be at least 1, got 0"),
    (["--steps", "0"], "steps must be at least 1, got 0"),
    (["--keep_last", "-1"], "keep_last must be at least 0, got -1"),
    (["--eval_every", "-2"], "eval_every must be at least 0, got -2"),
    (["--optim.grad_accum_steps", "0"], "optim.grad_accum_steps must be at least 1, got 0"),
    (["--optim.lr", "0"], "optim.lr must be greater than 0, got 0.0"),
    (["--optim.warmup_steps", "-1"], "optim.warmup_steps must be at least 0, got -1"),
    (["--data.augment", "nope"], "data.augment must be true or false, got 'nope'"),
    (["--data.augment", "1"], "data.augment must be true or false, got 1"),
    (["--tensorboard", "2"], "tensorboard must be true or false, got 2"),
    (["--data.batch_size", "2.5"], "data.batch_size must be a whole number, got 2.5"),
    (["--data.max_text_length", "100"], "data.max_text_length 100 is longer than the Q-Former's position table "
                                        "(model.stage1.qformer.max_position_embeddings 64)"),
    (["--model.stage1.qformer.num_attention_heads", "0"], "QFormerConfig.num_attention_heads must be at least 1, got 0"),
    (["--model.stage1.vision.patch_size", "0"], "VisionConfig.patch_size must be at least 1, got 0"),
    (["--model.stage1.num_query_tokens", "0"], "Blip2Stage1Config.num_query_tokens must be at least 1, got 0"),
    (["--optim.layer_decay", "0"], "optim.layer_decay must be in (0, 1], got 0.0"),
    (["--optim.epoch_steps", "0"], "optim.epoch_steps must be at least 1, got 0"),
    (["--optim.epoch_steps", "1"], "optim.warmup_steps 2 is longer than optim.epoch_steps 1: LAVIS's schedule warms "
                                   "up within the first epoch"),
    (["--model.vit_grad_checkpoint", "true"], "model.vit_grad_checkpoint recomputes the image encoder's blocks while "
                                              "it trains: it needs model.freeze_vit: false"),
    (["--model.question_to_qformer", "true"], "model.question_to_qformer gives the question to a stage-2 Q-Former: it "
                                              "needs model.stage: stage2"),
])
def test_recipe_values_are_checked(tmp_path, override, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        tiny(tmp_path, *override)


def test_booleans_take_true_or_false_only(tmp_path):
    assert tiny(tmp_path, "--data.augment", "false").data.augment is False
    assert tiny(tmp_path, "--data.augment", "yes").data.augment is True  # YAML's own boolean, as a recipe reads it
    assert tiny(tmp_path, "--keep_last", "0").keep_last == 0  # 0 keeps every checkpoint
    with pytest.raises(ValueError, match="DataSpec.augment must be true or false, got 'yes'"):
        DataSpec.from_dict({"augment": "yes"})  # a string, e.g. from JSON


def test_a_used_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    """A second run into a folder holding a run is refused in one line; --overwrite clears the
    earlier run's files (and leaves the user's own), then runs afresh."""
    run = tmp_path / "run"
    train(tiny(run, "--steps", "2", "--save_every", "1"))
    (run / "notes.txt").write_text("mine")
    refused = cli_error(capsys, "train", TINY, "--output_dir", run, "--steps", "1")
    for fragment in (f"{run} already holds a run", "--resume", "--overwrite"):
        assert fragment in refused, (fragment, refused)
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000001", "step_0000002"]  # untouched
    main(["train", str(TINY), "--output_dir", str(run), "--steps", "1", "--overwrite"])  # returns: exit status 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000001"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 1
    assert "is a folder: give a recipe (YAML), or add --resume" in cli_error(capsys, "train", run, "--steps", "2")


def test_resume_uses_the_runs_config_and_refuses_changes(tmp_path, caplog, capsys):
    """--resume reads the run's config.yaml: safe changes are applied, logged and recorded;
    changes to the model, data or optimisation are refused naming the keys."""
    run = tmp_path / "run"
    train(tiny(run, "--steps", "3"))
    with pytest.raises(ValueError, match=r"cannot resume with data.batch_size 4 -> 2, optim.lr 0.001 -> 0.0005"):
        train(tiny(run, "--steps", "6", "--optim.lr", "5e-4", "--data.batch_size", "2"), resume=True)
    with pytest.raises(ValueError, match=r"model.stage1.num_query_tokens 4 -> 8"):
        train(tiny(run, "--model.stage1.num_query_tokens", "8"), resume=True)
    with pytest.raises(ValueError, match=r"steps 2 is before the checkpoint .*step_0000003"):
        train(tiny(run, "--steps", "2"), resume=True)
    with pytest.raises(ValueError, match="choose one"):
        train(tiny(run), resume=True, overwrite=True)
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        train(tiny(empty), resume=True)
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint \(step_XXXXXXX/\) to resume from"):
        train(tiny(empty), resume=True)

    with caplog.at_level(logging.INFO, logger="qformer.train.loop"):
        result = train(tiny(run, "--steps", "5", "--log_every", "2"), resume=True)
    assert result["step"] == 5
    assert "resuming with log_every 1 -> 2, steps 3 -> 5 (recorded in config.yaml)" in caplog.text
    assert f"resumed from {run / 'step_0000003'} at step 3" in caplog.text
    recorded = load_train_config(run / "config.yaml")
    assert recorded.steps == 5 and recorded.log_every == 2 and recorded.optim.lr == 1e-3
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    # the command line: the run folder alone, --resume before or after it; a refusal is one line
    capsys.readouterr()
    main(["train", "--resume", str(run), "--steps", "6"])  # returns: exit status 0
    assert json.loads(capsys.readouterr().out)["step"] == 6 and load_train_config(run / "config.yaml").steps == 6
    assert "cannot resume with optim.weight_decay 0.05 -> 0.1" in cli_error(
        capsys, "train", run, "--resume", "--optim.weight_decay", "0.1")
    assert "holds no checkpoint" in cli_error(capsys, "train", TINY, "--output_dir", empty, "--resume")


def wait_for_metrics(process: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    """Until the run has logged its first step (its signal handlers are in place by then)."""
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended first: {((out or '') + (err or ''))[-3000:]}")
        assert time.monotonic() < deadline, "the run logged nothing"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, workers, group", [
    (signal.SIGTERM, 0, False),  # what a scheduler sends before pre-emption
    (signal.SIGINT, 2, True),  # Ctrl-C: the whole process group, DataLoader workers too
    (signal.SIGUSR1, 0, False),
])
def test_a_signal_saves_a_checkpoint_and_resume_reaches_the_same_weights(tmp_path, signum, workers, group):
    steps = 12  # the first steps take a second or more: the signal lands well before the end
    args = ["--steps", str(steps), "--save_every", "100", "--data.num_workers", str(workers)]
    run = tmp_path / "run"
    process = subprocess.Popen(QFORMER + ["train", str(TINY), "--output_dir", str(run), *args], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_metrics(process, run)
        os.killpg(process.pid, signum) if group else process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:  # a run that did not stop leaves nothing behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and out == ""
    saved = sorted(run.glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "trainer.pt").is_file(), err[-2000:]
    stop = int(saved[0].name.removeprefix("step_"))
    assert 1 <= stop < steps
    line = err.strip().splitlines()[-1]
    assert line == (f"qformer train: stopped by {signal.Signals(signum).name} after step {stop}: checkpoint "
                    f"{saved[0]}; resume with: qformer train {run} --resume")
    assert (run / "curves.png").is_file() and not (run / "final").exists()
    if signum != signal.SIGTERM:
        return
    resumed = qformer("train", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"  # run as the interrupted one was (same threads): bitwise the same
    assert qformer("train", TINY, "--output_dir", whole, *args).returncode == 0
    a, b = weights(whole, steps), weights(run, steps)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


@pytest.mark.numerics
def test_signal_handlers_are_restored_after_training(tmp_path):
    """Whatever handled the stop signals before a run handles them after it. The test installs its
    own handler for each first: a process started in the background by a non-interactive shell
    inherits SIGINT ignored, so Python's default handler is not what was there before."""
    before = {signum: signal.signal(signum, lambda *_: None) for signum in STOP_SIGNALS}
    try:
        mine = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        train(tiny(tmp_path, "--steps", "1"))
        assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == mine
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_eval_from_the_run_folder_a_checkpoint_or_final(tmp_path, capsys):
    """`qformer eval RUN` (its latest checkpoint), `RUN/step_X` and `RUN/final` with the run's
    config.yaml alone: the step and final/ of one run hold the same model, so the same results."""
    run = tmp_path / "run"
    train(tiny(run, "--steps", "3", "--data.eval_scenes_per_combination", "1"))
    main(["eval", str(run)])  # returns: exit status 0
    latest = json.loads(capsys.readouterr().out)
    assert latest["new_combinations/pairs"] == 32 and 0 <= latest["new_images/txt_r1"] <= 100
    assert json.loads((run / "step_0000003" / "eval.json").read_text()) == latest
    main(["eval", str(run / "final"), "--out", str(tmp_path / "final.json")])
    final = json.loads((tmp_path / "final.json").read_text())
    assert final == latest
    assert json.loads(capsys.readouterr().out) == final
    main(["eval", str(TINY), "--checkpoint", str(run / "step_0000003"), "--output_dir", str(run),
          "--data.eval_scenes_per_combination", "1", "--out", str(tmp_path / "recipe.json")])
    assert json.loads((tmp_path / "recipe.json").read_text()) == latest
    assert "is not a run folder" in cli_error(capsys, "eval", tmp_path / "nothing")
    assert "name the checkpoint with --checkpoint" in cli_error(capsys, "eval", TINY)
    (tmp_path / "loose").mkdir()
    assert "has no config.yaml" in cli_error(capsys, "eval", tmp_path / "loose")


def test_metric_names_are_clean_and_rounded(tmp_path):
    run = tmp_path / "run"
    result = train(tiny(run, "--steps", "2", "--eval_every", "2", "--data.eval_scenes_per_combination", "1"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = [line for line in lines if "loss" not in line]
    assert len(evaluation) == 1 and evaluation[0]["step"] == 2
    keys = set(evaluation[0]) - {"step"}
    assert {"eval/new_images/txt_r1", "eval/new_combinations/img_r1", "eval/new_combinations/r_mean"} <= keys
    assert all(k.count("/") == 2 for k in keys)
    assert all(round(v, 2) == v for v in evaluation[0].values())
    assert result["new_images/txt_r1"] == evaluation[0]["eval/new_images/txt_r1"]
    assert (run / "curves.png").stat().st_size > 1000


def test_curve_panels_put_training_first_and_group_each_set():
    names = ["itc", "loss", "itm", "lr", "eval/new_images/txt_r1", "eval/new_images/img_r1",
             "eval/new_images/chance_r1", "eval/new_images/pairs", "eval/accuracy", "eval/new_images/cider"]
    assert panels(names) == [
        ("loss", ["loss"]), ("itc", ["itc"]), ("itm", ["itm"]), ("lr", ["lr"]),
        ("eval/new_images recall (%)", ["eval/new_images/txt_r1", "eval/new_images/img_r1",
                                        "eval/new_images/chance_r1"]),
        ("eval/new_images/cider", ["eval/new_images/cider"]),
        ("eval/accuracy", ["eval/accuracy"]),
    ]


def test_the_run_says_what_it_does(tmp_path, caplog):
    """Start-up summary, the first skipped samples by name and reason, a skip count that carries
    across a resume, evaluation as one line."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(8):
        if i == 5:
            (data / f"{i}.png").write_text("not an image")
        elif i != 6:  # 6 is missing
            Image.new("RGB", (40, 40), (30 * i, 20, 200)).save(data / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"a picture number {i}", "image_id": i}))
    (data / "captions.jsonl").write_text("\n".join(rows) + "\n")
    args = ["--data.source", "captions", "--data.path", str(data / "captions.jsonl"), "--data.image_root", str(data),
            "--data.eval_path", str(data / "captions.jsonl"), "--save_every", "2"]
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qformer.train.loop"):
        train(tiny(run, *args, "--steps", "2"))  # 2 batches of 4: every sample once, 2 skipped
    text = caplog.text
    assert f"run {run}: 8 training samples, device cpu, precision fp32, world size 1" in text
    assert "global batch 4 (batch_size 4 x grad_accum 1 x world 1), 2 steps" in text
    trainable = sum(v.numel() for v in weights(run, 2).values())
    assert f"{trainable:,} trainable + " in text
    for number in (5, 6):
        assert f"skipped sample {number} ({data / f'{number}.png'}): " in text
    assert text.count("skipped sample ") == 2 and "(2 skipped so far)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qformer.train.loop"):
        train(tiny(run, *args, "--steps", "4", "--eval_every", "4"), resume=True)
    skipped = [json.loads(x)["skipped"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert skipped[1] == 2 and skipped[-1] == 4  # the count carries across the resume
    assert "(3 skipped so far)" in caplog.text and "(4 skipped so far)" in caplog.text
    assert "evaluation at step 4: eval/txt_r1 " in caplog.text
    evaluation = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" not in x]
    assert "eval/txt_r1" in evaluation[0] and not any(k.startswith("eval/eval/") for k in evaluation[0])


@pytest.mark.slow
def test_torchrun_ranks_stop_at_one_step_and_resume(tmp_path):
    """SIGTERM to torchrun reaches both ranks: they agree on a step, save one checkpoint with
    both RNG states and exit 143; resuming reaches the uninterrupted run's weights. Only rank 0
    prints the result."""
    from torch.testing import assert_close

    from test_train import free_port, torchrun

    def launch(folder: Path, *extra: str) -> subprocess.Popen:
        return torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        overrides=["--output_dir", str(folder), "--device", "cpu", "--data.batch_size", "2",
                                   "--steps", "12", "--save_every", "100", *extra])

    whole = launch(tmp_path / "whole")
    output = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0, output[-3000:]
    assert output.count('"samples_per_second"') == 1  # one JSON result, from rank 0
    part = tmp_path / "part"
    stopped = launch(part)
    wait_for_metrics(stopped, part, timeout=300)
    stopped.send_signal(signal.SIGTERM)
    output = stopped.communicate(timeout=300)[0]
    saved = sorted(part.glob("step_*"))
    assert len(saved) == 1 and sorted(p.name for p in saved[0].glob("rng_rank*")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert f"stopped by SIGTERM after step {int(saved[0].name[5:])}: checkpoint {saved[0]}" in output
    resumed = launch(part, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    a, b = weights(tmp_path / "whole", 12), weights(part, 12)
    for key in a:
        assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child process with RANK=rank)."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"torchrun has no worker of rank {rank}")


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(tmp_path):
    """torchrun --max-restarts 1: a worker killed once the first checkpoint is there; torchrun
    restarts both workers, which resume from the last checkpoint by themselves (the command says
    --overwrite, which a restart must not obey), and the run ends with the weights of one never
    interrupted."""
    from test_train import free_port, torchrun

    def launch(folder: Path) -> subprocess.Popen:
        return torchrun("--nproc_per_node", "2", "--max-restarts", "1", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()),
                        overrides=["--output_dir", str(folder), "--device", "cpu", "--data.batch_size", "2",
                                   "--steps", "12", "--save_every", "3", "--overwrite"])

    part = tmp_path / "part"
    restarted = launch(part)
    try:
        deadline = time.monotonic() + 300
        while not (part / "step_0000003").is_dir():
            assert restarted.poll() is None and time.monotonic() < deadline, restarted.communicate()[0][-3000:]
            time.sleep(0.02)
        os.kill(worker_pid(restarted, 1), signal.SIGKILL)
        output = restarted.communicate(timeout=300)[0]
    finally:
        if restarted.poll() is None:
            restarted.kill()
    assert restarted.returncode == 0, output[-3000:]
    resumed = re.search(r"torchrun restarted the workers \(restart 1\): resuming from (\S+)", output)
    assert resumed, output[-3000:]
    assert int(Path(resumed.group(1)).name.removeprefix("step_")) in (3, 6, 9)
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))
    whole = launch(tmp_path / "whole")
    output = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0 and "restarted" not in output, output[-3000:]
    a, b = weights(tmp_path / "whole", 12), weights(part, 12)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_restart_takes_over_only_the_run_its_launch_opened(tmp_path, monkeypatch, caplog):
    """A restarted worker (TORCHELASTIC_RESTART_COUNT 1) resumes the run its own torchrun launch
    opened; one whose first start was refused (the folder held another launch's run) is refused
    alike, and that run is left as it was."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    train(tiny(tmp_path, "--steps", "2", "--save_every", "1", "--data.batch_size", "2", "--device", "cpu"))
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(tmp_path, "--steps", "3", "--save_every", "1", "--data.batch_size", "2", "--device", "cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    with caplog.at_level(logging.INFO, logger="qformer.train.loop"):
        train(tiny(tmp_path, "--steps", "3", "--save_every", "1", "--data.batch_size", "2", "--device", "cpu"))
    assert f"torchrun restarted the workers (restart 1): resuming from {tmp_path / 'step_0000002'}" in caplog.text
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

"""Numerical faults and damaged checkpoints: a step with a non-finite loss or gradient norm is
skipped and never saved, too many in a row stop the run, non-finite weights are never written,
and a damaged or poisoned newest checkpoint makes resume, eval and export fall back to the one
before it, saying which."""

import itertools
import json
import math
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qformer.cli import main
from qformer.train import loop
from qformer.train.export import find_checkpoint
from qformer.train.faults import StepGuard
from qformer.train.loop import train
from qformer.train.state import latest_checkpoint, save_checkpoint
from test_train import TINY, tiny, weights

NAN = float("nan")


def poison(monkeypatch, bad_steps: set[int], where: str) -> None:
    """The run's loss (``where="loss"``) or only its gradients (``"gradient"``: the loss stays
    finite) made NaN on the given steps (one micro-step a step)."""
    build = loop.build_job

    def build_poisoned(config, runtime):
        job = build(config, runtime)
        losses, calls = job.losses, itertools.count(1)

        def poisoned(objective, batch, generator):
            parts = losses(objective, batch, generator)
            if next(calls) in bad_steps:
                if where == "loss":
                    return {**parts, "loss": parts["loss"] * NAN}
                # sqrt at 0: a finite value whose gradient is infinite, times 0: NaN
                return {**parts, "loss": parts["loss"] + 0 * torch.sqrt(job.model.query_tokens * 0).sum()}
            return parts

        job.losses = poisoned
        return job

    monkeypatch.setattr(loop, "build_job", build_poisoned)


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def optimizer_steps(run: Path, step: int) -> float:
    state = torch.load(run / f"step_{step:07d}" / "trainer.pt", weights_only=True)
    return float(state["optimizer"]["state"][0]["step"])


@pytest.mark.numerics
@pytest.mark.parametrize("where, found", [("loss", "loss nan, the gradient norm nan"),
                                          ("gradient", "the gradient norm nan")])
def test_a_non_finite_step_is_skipped_and_never_applied(tmp_path, monkeypatch, caplog, where, found):
    """Step 2's loss (or, with a finite loss, its gradient) is NaN: its update is not applied
    (the weights and the optimiser state of step 2 are those of step 1), a warning names it, the
    run goes on and counts it."""
    poison(monkeypatch, {2}, where)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="qformer.train.faults"):
        result = train(tiny(run, "--steps", "3", "--save_every", "1"))
    assert result["step"] == 3 and result["bad_steps"] == 1
    assert f"step 2 skipped, its update not applied: {found} (1 in a row; optim.max_bad_steps 10)" in caplog.text
    first, second, third = (weights(run, step) for step in (1, 2, 3))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.isfinite(t).all() for t in third.values()) and not torch.equal(third["query_tokens"],
                                                                                    second["query_tokens"])
    assert [optimizer_steps(run, step) for step in (1, 2, 3)] == [1.0, 1.0, 2.0]
    lines = logged(run)
    assert [line["bad_steps"] for line in lines] == [0, 1, 1]
    assert [math.isfinite(line["grad_norm"]) for line in lines] == [True, False, True]


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    """From step 2 on every loss is NaN: with optim.max_bad_steps 2, steps 2 and 3 are skipped
    and step 4 stops the run in one line; no checkpoint of the bad steps holds a NaN, and a
    resume continues from the last one."""
    poison(monkeypatch, set(range(2, 100)), "loss")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["train", str(TINY), "--output_dir", str(run), "--save_every", "1", "--optim.max_bad_steps", "2"])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1:]  # after the progress bar
    assert error == ["qformer train: too many non-finite steps in a row (3, up to step 4; the last: loss nan, the "
                     "gradient norm nan), more than optim.max_bad_steps 2: stopped; none of them changed the weights, "
                     "and a resume continues from the last checkpoint"]
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000001", "step_0000002", "step_0000003"]
    assert all(torch.isfinite(t).all() for step in (1, 2, 3) for t in weights(run, step).values())
    assert latest_checkpoint(run) == run / "step_0000003"
    with pytest.raises(ValueError, match="optim.max_bad_steps must be at least 0, got -1"):
        tiny(run, "--optim.max_bad_steps", "-1")


class Scaler:
    """The two methods of an enabled GradScaler that the guard reads."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale


def test_fp16_overflow_is_the_scalers_own_until_its_scale_collapses():
    """fp16: overflowing gradients with a finite loss are left to the GradScaler (it skips the
    update) and not counted while its scale is 1 or more; below 1, or with a non-finite loss,
    the step is bad."""
    overflow = {"loss": 2.0, "grad_norm": math.inf}
    guard = StepGuard(max_bad_steps=1)
    assert guard.apply(5, overflow, Scaler(2.0**10)) and guard.bad_steps == 0
    assert not guard.apply(6, {"loss": NAN, "grad_norm": NAN}, Scaler(2.0**10)) and guard.bad_steps == 1
    with pytest.raises(FloatingPointError, match=r"too many non-finite steps in a row \(2, up to step 7; the last: "
                                                 r"the gradient norm inf\)"):
        guard.apply(7, overflow, Scaler(0.5))


def test_non_finite_weights_or_optimizer_states_are_never_saved(tmp_path):
    from stage1_helpers import tiny_stage1

    model = tiny_stage1()
    trainable = sum(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.query_tokens[0, 0, 0] = NAN
    with pytest.raises(FloatingPointError, match=rf"^not saving the checkpoint of step 5: 1 of {trainable} trainable "
                                                 r"weights hold NaN or infinite values \(e.g. query_tokens\)$"):
        save_checkpoint(tmp_path, 5, model, {"optimizer": {"state": {}}}, rank=0, keep_last=2)
    model = tiny_stage1()
    states = {"optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3),
                                          "exp_avg_sq": torch.tensor([1.0, float("inf"), 0.0])}}}}
    with pytest.raises(FloatingPointError, match=r"1 of 3 optimizer states .* \(e.g. optimizer state 0.exp_avg_sq\)"):
        save_checkpoint(tmp_path, 5, model, states, rank=0, keep_last=2)
    assert list(tmp_path.iterdir()) == []  # not even a staging folder


def damage(checkpoint: Path, kind: str) -> str:
    """Damage one file of ``checkpoint``; returns what verification should say of it."""
    if kind == "truncated weights":
        file = checkpoint / "trainable.safetensors"
        size = file.stat().st_size
        file.write_bytes(file.read_bytes()[: size // 2])
        return f"trainable.safetensors is {size // 2} bytes, {size} when saved"
    if kind == "empty trainer.pt":
        size = (checkpoint / "trainer.pt").stat().st_size
        (checkpoint / "trainer.pt").write_bytes(b"")
        return f"trainer.pt is 0 bytes, {size} when saved"
    if kind == "flipped byte":  # the same size: only the checksum can tell
        file = checkpoint / "trainable.safetensors"
        data = bytearray(file.read_bytes())
        data[-1] ^= 0xFF
        file.write_bytes(bytes(data))
        return "trainable.safetensors does not match its SHA-256 from when it was saved"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(run))
    return run


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["truncated weights", "empty trainer.pt", "flipped byte"])
def test_resume_falls_back_from_a_damaged_checkpoint(finished, tmp_path, caplog, kind):
    """The newest checkpoint damaged: resume warns naming it and why and the one it falls back
    to, and reaches the same weights from there; eval and export name it when it is asked for."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    expected = {k: v.clone() for k, v in weights(run, 6).items()}  # before the file changes under its map
    shutil.rmtree(run / "final")
    why = damage(run / "step_0000006", kind)
    with caplog.at_level(logging.WARNING, logger="qformer.train.state"):
        assert find_checkpoint(run) == (run / "step_0000003", run)
    assert f"checkpoint {run / 'step_0000006'} is damaged ({why}): not used" in caplog.text
    assert f"falling back to checkpoint {run / 'step_0000003'}, the newest that is intact" in caplog.text
    with pytest.raises(ValueError, match=rf"^checkpoint {run / 'step_0000006'} is damaged: {why}$"):
        find_checkpoint(run / "step_0000006")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(tiny(run), resume=True)
    assert f"checkpoint {run / 'step_0000006'} is damaged ({why}): not used" in caplog.text
    assert f"resumed from {run / 'step_0000003'} at step 3" in caplog.text
    again = weights(run, 6)
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_saving_after_a_fallback_replaces_the_damaged_later_checkpoint(finished, tmp_path):
    """Resumed from step 3 past a damaged step 6, saving every 4: step 4 removes the damaged
    step_0000006, which would otherwise outrank it: kept in place of a good one, and found first
    by every later resume."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run / "step_0000006", "empty trainer.pt")
    train(tiny(run, "--steps", "8", "--save_every", "4"), resume=True)  # keep_last 5
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000003", "step_0000004", "step_0000008"]


def test_eval_names_a_damaged_checkpoint(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    why = damage(run / "step_0000003", "empty trainer.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", str(run / "step_0000003")])
    assert capsys.readouterr().err.strip() == f"qformer eval: checkpoint {run / 'step_0000003'} is damaged: {why}"


def test_checkpoints_from_before_checksums(finished, tmp_path, caplog):
    """Without checksums.json (older runs) a checkpoint is used when its files read back and its
    weights are finite; one with NaN weights (what a bad step used to save) is passed over, and
    a run with only damaged checkpoints is refused, naming each."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for step in (3, 6):
        (run / f"step_{step:07d}" / "checksums.json").unlink()
    assert latest_checkpoint(run) == run / "step_0000006"
    poisoned = load_file(run / "step_0000006" / "trainable.safetensors")
    poisoned["query_tokens"][0, 0, 0] = NAN
    save_file(poisoned, run / "step_0000006" / "trainable.safetensors")
    with caplog.at_level(logging.WARNING, logger="qformer.train.state"):
        assert latest_checkpoint(run) == run / "step_0000003"
    assert "weights are not finite (e.g. query_tokens)): not used" in caplog.text
    (run / "step_0000003" / "trainer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^every checkpoint in {run} is damaged: step_0000006 \(1 of \d+ weights "
                                         r"are not finite .*\); step_0000003 \(trainer.pt: a damaged or truncated"):
        latest_checkpoint(run)


def test_clipping_clips_and_returns_the_norm():
    """clip_gradients scales the gradients to max_norm and returns their norm before (it used to
    hand clip_grad_norm_ the gradients instead of the parameters, and clip nothing)."""
    from qformer.train.parallel import clip_gradients, gradient_norm

    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(2, 4)).pow(2).sum().mul(100).backward()
    before = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()
    assert before > 1 and torch.allclose(gradient_norm(layer.parameters()), before)
    assert torch.allclose(clip_gradients(layer.parameters(), 1.0), before)
    assert torch.allclose(gradient_norm(layer.parameters()), torch.tensor(1.0), atol=1e-5)

"""The trainer: recipes, optimiser groups, schedule, checkpoints, exact resume, skip-and-count,
the CLI, and torchrun (2 processes; 2 nodes on loopback)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from qformer.pretrained.stage1 import Blip2Stage1
from qformer.train.config import OptimSpec, load_train_config
from qformer.train.loop import train
from qformer.train.optim import lr_factor, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(tmp_path: Path, *overrides: str):
    return load_train_config(TINY, ["--output_dir", str(tmp_path), *overrides])


def weights(run: Path, step: int) -> dict:
    return load_file(run / f"step_{step:07d}" / "trainable.safetensors")


def test_every_recipe_loads():
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_train_config(recipe)
        assert config.steps > 0, recipe


def test_overrides_are_typed_and_checked(tmp_path):
    config = tiny(tmp_path, "--optim.lr", "3e-4", "--data.batch_size=8", "--precision", "bf16")
    assert config.optim.lr == 3e-4 and config.data.batch_size == 8 and config.precision == "bf16"
    with pytest.raises(ValueError, match="optim.lr must be a number"):
        tiny(tmp_path, "--optim.lr", "fast")
    with pytest.raises(ValueError, match="unknown field"):
        tiny(tmp_path, "--optim.learning_rate", "1")
    with pytest.raises(ValueError, match="precision"):
        tiny(tmp_path, "--precision", "fp8")


def test_weight_decay_only_on_trainable_matrices():
    from stage1_helpers import tiny_stage1

    model = tiny_stage1()
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and p.requires_grad for p in decay["params"])
    assert all(p.ndim < 2 and p.requires_grad for p in no_decay["params"])
    frozen = {id(p) for p in model.vision.parameters()}
    assert not frozen & {id(p) for p in decay["params"] + no_decay["params"]}
    assert any(p is model.temp for p in no_decay["params"]) and any(p is model.query_tokens for p in decay["params"])


def test_warmup_then_cosine_to_min_lr():
    spec = OptimSpec(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_factor(0, 110, spec) == pytest.approx(0.1)
    assert lr_factor(9, 110, spec) == pytest.approx(1.0)
    assert lr_factor(60, 110, spec) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_factor(110, 110, spec) == pytest.approx(0.1)


def test_run_writes_checkpoints_metrics_and_plots(tmp_path):
    result = train(tiny(tmp_path, "--keep_last", "1"))
    assert result["step"] == 6 and torch.isfinite(torch.tensor(result["loss"]))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "itc", "itm", "itg", "lr", "samples_per_second", "skipped"} <= set(lines[0])
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000006"]  # keep_last 1
    assert not list(tmp_path.glob(".staging*"))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert load_train_config(tmp_path / "config.yaml") == tiny(tmp_path, "--keep_last", "1")
    final = Blip2Stage1.from_pretrained(tmp_path / "final")
    trained = weights(tmp_path, 6)
    assert torch.equal(final.state_dict()["query_tokens"], trained["query_tokens"])


@pytest.mark.numerics
def test_resumed_run_reaches_the_same_weights(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(tiny(whole))
    train(tiny(part, "--steps", "6"))
    for name in ("step_0000006", "final"):  # as if the run had died after step 3
        import shutil

        shutil.rmtree(part / name)
    train(tiny(part), resume=True)
    a, b = weights(whole, 6), weights(part, 6)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    # and the run really changed the weights
    assert not torch.equal(weights(whole, 3)["query_tokens"], a["query_tokens"])


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(8):
        name = f"{i}.png"
        if i == 5:
            (data / name).write_text("not an image")
        elif i != 6:  # 6 is missing
            Image.new("RGB", (40, 40), (30 * i, 20, 200)).save(data / name)
        rows.append(json.dumps({"image": name, "caption": f"a picture number {i}", "image_id": i}))
    (data / "captions.jsonl").write_text("\n".join(rows) + "\n")
    config = tiny(tmp_path / "run", "--data.source", "captions", "--data.path", str(data / "captions.jsonl"),
                  "--data.image_root", str(data), "--steps", "2")
    train(config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped"] == 2  # two batches of 4 cover all 8 samples once
    strict = tiny(tmp_path / "strict", "--data.source", "captions", "--data.path", str(data / "captions.jsonl"),
                  "--data.image_root", str(data), "--steps", "2", "--data.strict", "true")
    with pytest.raises(ValueError, match=r"cannot read sample \d \(.*[56]\.png\)"):
        train(strict)


def test_cli_train_and_eval(tmp_path):
    run = [sys.executable, "-m", "qformer"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(run + ["train", str(TINY), "--output_dir", str(tmp_path), "--steps", "3"],
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["step"] == 3
    out = subprocess.run(run + ["eval", str(TINY), "--checkpoint", str(tmp_path / "step_0000003"),
                                "--data.eval_scenes_per_combination", "1"],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    assert 0 <= result["new_combinations/txt_r1"] <= 100 and result["new_combinations/pairs"] == 32
    assert result["new_images/pairs"] == 184
    assert json.loads((tmp_path / "step_0000003" / "eval.json").read_text())["new_combinations/pairs"] == 32
    bad = subprocess.run(run + ["train", str(TINY), "--nonsense"], capture_output=True, text=True, env=env, check=False)
    assert bad.returncode != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "torchrun"), *args, "-m", "qformer", "train", str(TINY)]
    return subprocess.Popen(command + list(kwargs["overrides"]), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_torchrun_two_processes_and_two_nodes_on_loopback(tmp_path):
    overrides = ["--data.batch_size", "2"]
    single = torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                      overrides=overrides + ["--output_dir", str(tmp_path / "one_node")])
    output = single.communicate(timeout=300)[0]
    assert single.returncode == 0, output[-3000:]
    port = str(free_port())
    nodes = [
        torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                 "--master_port", port, overrides=overrides + ["--output_dir", str(tmp_path / "two_nodes")])
        for rank in (0, 1)
    ]
    for node in nodes:
        output = node.communicate(timeout=300)[0]
        assert node.returncode == 0, output[-3000:]
    a, b = weights(tmp_path / "one_node", 6), weights(tmp_path / "two_nodes", 6)
    assert sorted(a) == sorted(b)
    for key in a:  # gloo may sum in another order across nodes: equal to float rounding
        assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(p.name for p in (tmp_path / "two_nodes").glob("step_*")) == ["step_0000003", "step_0000006"]
    # every rank saved its RNG state for an exact resume
    assert sorted(p.name for p in (tmp_path / "two_nodes" / "step_0000006").glob("rng_rank*")) == [
        "rng_rank0.pt", "rng_rank1.pt"]


def test_stage1_image_encoder_from_vision_weights(tmp_path):
    """``model.vision_weights``: the frozen encoder comes exactly from a safetensors file of
    ``vision.*`` weights or a stage-1 directory; one of another shape fails, naming the keys."""
    from qformer.config import VisionConfig
    from qformer.models.vision import EvaViT
    from qformer.train.stage1_job import build_model

    config = tiny(tmp_path)
    torch.manual_seed(11)
    donor = Blip2Stage1(config.model.stage1)
    donor.save_pretrained(tmp_path / "stage1_dir")
    save_file({f"vision.{k}": v for k, v in donor.vision.state_dict().items()}, tmp_path / "encoder.safetensors")
    default, _ = build_model(config)
    assert not torch.equal(default.vision.patch_embedding.weight, donor.vision.patch_embedding.weight)
    for source in (tmp_path / "encoder.safetensors", tmp_path / "stage1_dir"):
        model, _ = build_model(tiny(tmp_path, "--model.vision_weights", str(source)))
        for name, tensor in donor.vision.state_dict().items():
            assert torch.equal(model.vision.state_dict()[name], tensor), (source, name)
        assert not any(p.requires_grad for p in model.vision.parameters())
    narrow = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=16)
    save_file({f"vision.{k}": v for k, v in EvaViT(narrow).state_dict().items()}, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match=r"(?s)narrow.safetensors does not fit model.stage1.vision.*patch_embedding"):
        build_model(tiny(tmp_path, "--model.vision_weights", str(tmp_path / "narrow.safetensors")))


def test_a_recipe_at_another_image_size_resizes_the_encoder_and_saves_it(tmp_path):
    """BLIP-2 fine-tunes its 224-px encoder at 364 px: a recipe's data.image_size above the
    encoder's interpolates its position table, and final/ loads at that size."""
    from qformer.train.stage1_job import build_model

    config = tiny(tmp_path)
    model, _ = build_model(config)
    size = config.model.stage1.vision.image_size
    bigger, _ = build_model(tiny(tmp_path, "--data.image_size", str(2 * size)))
    assert bigger.vision.image_size == 2 * size and bigger.config.image.size == 2 * size
    grid = 2 * size // bigger.config.vision.patch_size
    assert bigger.vision.position_embedding.shape == (1, 1 + grid * grid, bigger.config.vision.hidden_size)
    assert not bigger.vision.position_embedding.requires_grad  # still frozen
    pixels = torch.rand(2, 3, 2 * size, 2 * size)
    features = bigger.image_embeds(pixels)
    bigger.save_pretrained(tmp_path / "final")
    reloaded = Blip2Stage1.from_pretrained(tmp_path / "final")
    assert reloaded.vision.image_size == 2 * size and reloaded.config.image.size == 2 * size
    torch.testing.assert_close(reloaded.image_embeds(pixels), features)


def test_stage1_can_start_from_a_stage1_model(tmp_path):
    """Retrieval fine-tuning starts from stage 1 (LAVIS's retrieval_coco_ft.yaml)."""
    from qformer.train.stage1_job import build_model

    donor, tokenizer = build_model(tiny(tmp_path))
    donor.save_pretrained(tmp_path / "s1")
    model, loaded_tokenizer = build_model(tiny(tmp_path, "--model.init_from", str(tmp_path / "s1")))
    for name, tensor in donor.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    with pytest.raises(ValueError, match="model.init_from brings its Q-Former and image encoder"):
        build_model(tiny(tmp_path, "--model.init_from", str(tmp_path / "s1"), "--model.bert", "minilm"))


def caption_shards(root: Path, shards: int = 4, per_shard: int = 5, broken: tuple[int, ...] = ()) -> str:
    """Tar shards of coloured pictures with numbered captions (sample n of shard n // per_shard);
    the samples in ``broken`` alternate between a non-image and a missing caption. Returns the glob."""
    from qformer.data.shards import write_tar_shard

    root.mkdir(parents=True)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            sample = {"__key__": f"{n:06d}", "png": Image.new("RGB", (40, 36), (50 * s, 40 * i, 200 - 7 * n)),
                      "txt": f"a picture number {n}"}
            if n in broken[::2]:
                sample["png"] = b"not an image"
            elif n in broken:
                del sample["txt"]
            samples.append(sample)
        write_tar_shard(root / f"part-{s:03d}.tar", samples)
    return str(root / "part-*.tar")


def losses_logged(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def without_speed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples_per_second"} for r in records]


def test_shards_train_count_skipped_and_evaluate(tmp_path):
    """`data.source: shards`: stage 1 from a glob of tar shards, unreadable samples counted,
    epochs that loop, held-out shards evaluated."""
    train_glob = caption_shards(tmp_path / "train", broken=(7, 12))
    held_out = caption_shards(tmp_path / "held_out", shards=1, per_shard=6, broken=(2,))
    run = tmp_path / "run"
    result = train(tiny(run, "--data.source", "shards", "--data.path", train_glob, "--data.eval_path", held_out,
                        "--eval_every", "6"))
    assert result["step"] == 6 and torch.isfinite(torch.tensor(result["loss"]))
    lines = losses_logged(run)
    # one reader, 20 samples: 5 batches of 4 in epoch 0 (the 2 broken ones among them), then epoch 1
    assert [r["epoch"] for r in lines] == [0, 0, 0, 0, 0, 1]
    assert lines[4]["skipped"] == 2
    assert (run / "step_0000006" / "trainable.safetensors").is_file() and (run / "final" / "config.json").is_file()
    evaluation = json.loads((run / "eval_step_0000006.json").read_text())
    assert evaluation["eval/pairs"] == 5 and 0 <= evaluation["eval/txt_r1"] <= 100


@pytest.mark.numerics
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_shard_run_reaches_the_same_weights(tmp_path, workers):
    """Stopped after step 3 and resumed, a shard run skips to its place in the epoch and ends
    bitwise where an uninterrupted run ends, across the epoch's end (two readers: 4 batches an
    epoch; one reader: 5)."""
    import shutil

    data = caption_shards(tmp_path / "shards", broken=(3,))
    args = ["--data.source", "shards", "--data.path", data, "--data.num_workers", str(workers)]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(tiny(whole, *args))
    train(tiny(part, *args))
    for name in ("step_0000006", "final"):
        shutil.rmtree(part / name)
    train(tiny(part, *args), resume=True)
    a, b = weights(whole, 6), weights(part, 6)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert without_speed(losses_logged(part)) == without_speed(losses_logged(whole))  # losses, epochs, skipped
    assert losses_logged(whole)[-1]["epoch"] == 1
    assert not torch.equal(weights(whole, 3)["query_tokens"], a["query_tokens"])


def test_shard_stream_reads_each_sample_once_and_restarts_midway(tmp_path):
    """Two ranks x two readers share 8 shards: every sample once an epoch, another shard order
    the next epoch, batches that mix shards (the shuffle buffer); a stream started at batch 3
    gives the epoch's batches from 3 on, the same augmented pixels included."""
    from torch.utils.data import DataLoader

    from qformer.config import ImageConfig
    from qformer.data.shards import TarShardDataset, expand_shards
    from qformer.train.batches import ShardStream
    from qformer.train.data import TrainShards

    paths = expand_shards(caption_shards(tmp_path / "shards", shards=8, per_shard=3))

    def epoch(rank: int, number: int, start: int = 0) -> list:
        reader = TarShardDataset(paths, rank=rank, world_size=2, shuffle_seed=5, shuffle_buffer=4)
        shards = TrainShards(reader, ImageConfig(size=16), 0)
        shards.set_epoch(number)
        stream = ShardStream(shards, lambda samples: {"samples": samples}, batch_size=2, readers=2, quota=None)
        stream.start = start
        return list(DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda batch: batch))

    def texts(batches: list) -> list[str]:
        return [s["text"] for batch in batches if batch is not None for s in batch["samples"]]

    first = [epoch(rank, 0) for rank in (0, 1)]
    seen = texts(first[0]) + texts(first[1])
    assert sorted(seen) == sorted(f"a picture number {n}" for n in range(24))
    assert sorted(texts(epoch(0, 1))) != sorted(texts(first[0]))
    mixed = [b for b in first[0] + first[1] if b is not None and len({p.partition(":")[0] for p in b["places"]}) > 1]
    assert mixed, "no batch mixes two shards"
    full = first[0]
    end = full.index(None)
    resumed = epoch(0, 0, start=3)
    assert resumed.index(None) == end - 3 and texts(resumed[: end - 3]) == texts(full[3:end])
    for later, earlier in zip(resumed[: end - 3], full[3:end]):
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(later["samples"], earlier["samples"]))


def test_shards_that_cannot_feed_every_reader_are_refused(tmp_path):
    data = caption_shards(tmp_path / "shards", shards=2, per_shard=3)
    args = ["--data.source", "shards", "--data.path", data]
    with pytest.raises(ValueError, match=r"2 tar shards for 1 ranks x 4 readers"):
        train(tiny(tmp_path / "many", *args, "--data.num_workers", "4"))
    with pytest.raises(ValueError, match=r"epoch 0 gave no batch.*batch_size = 4"):
        train(tiny(tmp_path / "few", *args, "--data.num_workers", "2"))
    with pytest.raises(ValueError, match="no tar shard matches"):
        train(tiny(tmp_path / "none", "--data.source", "shards", "--data.path", str(tmp_path / "nothing-*.tar")))


def test_vqa_finetune_and_eval(tmp_path):
    """`data.source: vqa`: stage 2 learns the most frequent answer after the prompt (labels on
    the answer only); the run's evaluation and `qformer eval` report VQAv2 accuracy of the
    generated answers, as qformer.evaluate.vqa scores them."""
    from qformer.cli import main
    from qformer.evaluate.vqa import vqa_score
    from qformer.losses import IGNORE_INDEX
    from qformer.train.build import build_job
    from qformer.train.distributed import Runtime
    from stage2_helpers import save_tiny_blip2

    save_tiny_blip2(tmp_path / "blip2", "opt")
    data = tmp_path / "data"
    data.mkdir()
    answers = [["blue", "red", "red"], ["blue"], ["green", "green", "yes"], ["no", "yes", "yes", "yes"]]
    entries = []
    for i, (colour, truth) in enumerate(zip(["red", "blue", "green", "yellow"], answers)):
        Image.new("RGB", (30, 28), colour).save(data / f"{i}.png")
        entries.append({"image": f"{i}.png", "question": "What colour is it?", "answer": truth, "question_id": 10 + i})
    (data / "vqa.json").write_text(json.dumps(entries))
    run = tmp_path / "run"
    config = load_train_config(None, [
        "--model.stage", "stage2", "--model.blip2", str(tmp_path / "blip2"), "--data.source", "vqa",
        "--data.path", str(data / "vqa.json"), "--data.eval_path", str(data / "vqa.json"),
        "--data.image_root", str(data), "--data.image_size", "28", "--data.vqa_prompt", '"question : {} answer :"',
        "--data.batch_size", "2", "--data.num_workers", "0", "--steps", "2", "--optim.warmup_steps", "1",
        "--optim.lr", "1e-3", "--log_every", "1", "--eval_every", "2", "--output_dir", str(run)])

    job = build_job(config, Runtime(0, 1, 0, torch.device("cpu")))
    batch = job.collate([job.dataset[(0, 0)], job.dataset[(0, 3)]])
    tokenizer, suffix = job.model.tokenizer, job.model.config.text_suffix or job.model.tokenizer.eos_token
    for row, answer in enumerate(["red", "yes"]):  # the most frequent answer, not the first
        prompt = tokenizer("question : what colour is it? answer :").input_ids
        target = tokenizer(answer + suffix, add_special_tokens=False).input_ids
        length = len(prompt) + len(target)
        assert batch["input_ids"][row, :length].tolist() == prompt + target
        assert batch["labels"][row, :length].tolist() == [IGNORE_INDEX] * len(prompt) + target
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()

    result = train(config)
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))

    def check(results: dict) -> None:
        predictions = {p["question_id"]: p["answer"] for p in results["eval/predictions"]}
        assert sorted(predictions) == [10, 11, 12, 13] and results["eval/count"] == 4
        expected = round(vqa_score([predictions[10 + i] for i in range(4)], answers)["accuracy"], 2)
        assert 0 <= results["eval/accuracy"] <= 100 and results["eval/accuracy"] == expected

    check(json.loads((run / "eval_step_0000002.json").read_text()))
    from qformer.pretrained.stage2 import Blip2  # a fine-tuned released model ends in final/ as well
    assert Blip2.from_pretrained(run / "final").config.image_token_index == job.model.config.image_token_index
    main(["eval", str(run / "config.yaml"), "--checkpoint", str(run / "step_0000002")])
    check(json.loads((run / "step_0000002" / "eval.json").read_text()))

"""Fine-tuning as the papers do: the image encoder trained (BLIP-2's COCO recipes), LAVIS's
layer-wise lr scales and once-an-epoch cosine, the VQA question given to the Q-Former (BLIP-2,
Section 4.3), InstructBLIP's square-root balancing of several instruction sets."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from qformer.objective import Stage1Objective
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.pretrained.stage2 import Blip2, InstructBlip
from qformer.train.config import ModelSpec, OptimSpec, load_train_config
from qformer.train.image_encoder import prepare_image_encoder
from qformer.train.loop import train
from qformer.train.optim import build_optimizer, build_scheduler, lr_factor
from qformer.train.sampler import GlobalBatchSampler, SetMixture
from stage1_helpers import IMAGE, tiny_batch, tiny_stage1
from stage2_helpers import save_tiny_blip2, tiny_tokenizer
from test_train import tiny, weights

TRAINED = ModelSpec(freeze_vit=False)


def stage1_step(model: Blip2Stage1, seed: int = 3) -> torch.Tensor:
    """One stage-1 loss on pixels (fixed negatives), its backward done."""
    ids, mask, _ = tiny_batch(4)
    pixels = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    model.train()
    loss = Stage1Objective(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(seed)).loss
    loss.backward()
    return loss.detach()


def test_gradients_reach_the_image_encoder_only_when_it_trains():
    frozen = tiny_stage1()
    stage1_step(frozen)
    assert all(p.grad is None for p in frozen.vision.parameters()) and not frozen.vision.training
    trained = tiny_stage1()
    prepare_image_encoder(trained, TRAINED)
    stage1_step(trained)
    assert trained.vision.training and trained.vision_trains
    for name, param in trained.vision.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    qkv = trained.vision.layers[0].attn.qkv
    width = qkv.weight.shape[1]
    assert not qkv.bias.grad[width : 2 * width].any()  # EVA has no key bias: it stays zero


@pytest.mark.numerics
def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    plain = tiny_stage1()
    prepare_image_encoder(plain, ModelSpec(freeze_vit=False, vit_grad_checkpoint=False))
    recomputed = copy.deepcopy(plain)
    recomputed.vision.gradient_checkpointing = True
    calls = []
    recomputed.vision.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    assert_close(stage1_step(recomputed), stage1_step(plain))
    assert len(calls) == 2  # forward, then again in backward
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        if a.grad is not None:
            assert_close(b.grad, a.grad, msg=name)
    assert ModelSpec(freeze_vit=False).encoder_checkpointing and not ModelSpec().encoder_checkpointing


def test_layer_decay_scales_are_lavis_s():
    """LAVIS's get_optimizer_params with lr_layer_decay d and L = 2 blocks: lr_scales =
    [d ** (L + 1 - i) for i in range(L + 2)]; embeddings layer 0, block k layer k + 1."""
    model = tiny_stage1()
    prepare_image_encoder(model, TRAINED)
    spec = OptimSpec(lr=2.0, min_lr=0.0, warmup_steps=0, layer_decay=0.5)
    optimizer = build_optimizer(model, spec)
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    d = 0.5
    expected = {"patch_embedding": d**3, "class_embedding": d**3, "position_embedding": d**3, "layers.0.": d**2,
                "layers.1.": d**1}
    for name, param in model.named_parameters():
        prefix = next((k for k in expected if name.startswith(f"vision.{k}")), None)
        scale = 1.0 if prefix is None else expected[prefix]
        assert lr_of[id(param)] == (pytest.approx(2.0 * scale), 0.05 if param.ndim >= 2 else 0.0), name
    scheduler = build_scheduler(optimizer, 10, spec)
    optimizer.step()  # no gradients: nothing moves
    scheduler.step()
    group = next(g for g in optimizer.param_groups if any(p is model.vision.layers[0].mlp.fc1.weight for p in g["params"]))
    assert group["lr"] == pytest.approx(2.0 * d**2 * lr_factor(1, 10, spec))
    with pytest.raises(ValueError, match="optim.layer_decay scales the lr of the image encoder's layers: it needs "
                                         "model.freeze_vit: false"):
        tiny(Path("unused"), "--optim.layer_decay", "0.9")


def test_epoch_cosine_moves_once_an_epoch_as_lavis():
    """LAVIS's linear_warmup_cosine_lr: warm-up in epoch 0, then lr(e) = 0.5 (1 + cos(pi e / epochs))."""
    spec = OptimSpec(lr=1.0, min_lr=0.0, warmup_steps=2, epoch_steps=5)
    factors = [lr_factor(step, 20, spec) for step in range(20)]
    lavis = [0.5 * (1 + math.cos(math.pi * (step // 5) / 4)) for step in range(20)]
    assert factors[:2] == [0.5, 1.0] and factors[2:] == pytest.approx(lavis[2:])


def test_a_run_trains_the_image_encoder_and_final_gives_it_back(tmp_path):
    """Stage 1 (a retrieval fine-tuning) with freeze_vit false under bf16 autocast: the encoder
    is held in fp32 (vision_dtype float16 asked), its weights move, and final/ and the rebuilt
    checkpoint load them."""
    from qformer.train.build import build_trained_model
    from qformer.train.stage1_job import build_model

    config = tiny(tmp_path / "run", "--model.freeze_vit", "false", "--model.stage1.vision_dtype", "float16",
                  "--optim.layer_decay", "0.9", "--precision", "bf16", "--steps", "2", "--save_every", "2")
    torch.manual_seed(config.seed)
    start, _ = build_model(config)
    assert {p.dtype for p in start.vision.parameters()} == {torch.float32} and start.config.vision_dtype == "float32"
    train(config)
    trained = weights(tmp_path / "run", 2)
    encoder = {k: v for k, v in trained.items() if k.startswith("vision.")}
    assert encoder.keys() == {f"vision.{k}" for k in start.vision.state_dict()}
    assert not torch.equal(encoder["vision.layers.0.mlp.fc1.weight"], start.vision.layers[0].mlp.fc1.weight)
    reloaded = Blip2Stage1.from_pretrained(tmp_path / "run" / "final").state_dict()
    rebuilt = build_trained_model(config, tmp_path / "run" / "step_0000002").state_dict()
    for key, value in trained.items():
        assert torch.equal(reloaded[key], value) and torch.equal(rebuilt[key], value), key


def vqa_data(root: Path) -> Path:
    """Four coloured images, two questions each."""
    root.mkdir()
    entries = []
    for i, colour in enumerate(["red", "blue", "green", "red"]):
        Image.new("RGB", (28, 28), colour).save(root / f"{i}.png")
        for j, question in enumerate(["what colour is it", "is it a ball"]):
            entries.append({"image": f"{i}.png", "question": question, "answer": [colour if j == 0 else "no"],
                            "question_id": 2 * i + j})
    (root / "vqa.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="module")
def vqa_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a tiny BLIP-2 directory with no Q-Former text path, a stage-1 model of its Q-Former's
    shape with a tokenizer, VQA data)."""
    root = tmp_path_factory.mktemp("vqa")
    save_tiny_blip2(root / "blip2", "opt")
    stage1 = tiny_stage1()
    stage1.tokenizer = tiny_tokenizer(add_bos=False)  # word ids < 50: the Q-Former's vocabulary
    stage1.save_pretrained(root / "stage1")
    return root / "blip2", root / "stage1", vqa_data(root / "data")


def vqa_config(setup: tuple[Path, Path, Path], run: Path, *overrides: str):
    blip2, stage1, data = setup
    return load_train_config(None, [
        "--model.stage", "stage2", "--model.blip2", str(blip2), "--data.source", "vqa",
        "--data.path", str(data / "vqa.json"), "--data.eval_path", str(data / "vqa.json"),
        "--data.image_root", str(data), "--data.image_size", "28", "--data.vqa_prompt", '"question : {} answer :"',
        "--data.augment", "false", "--data.batch_size", "2", "--data.num_workers", "0", "--steps", "2",
        "--optim.warmup_steps", "1", "--optim.lr", "1e-3", "--log_every", "1", "--output_dir", str(run), *overrides])


@pytest.mark.numerics
def test_the_question_reaches_the_qformer_only_when_asked(vqa_setup, tmp_path):
    from qformer.train.build import build_job
    from qformer.train.distributed import Runtime

    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    for on in (True, False):
        extra = ["--model.question_to_qformer", "true", "--model.init_from", str(vqa_setup[1])] if on else []
        job = build_job(vqa_config(vqa_setup, tmp_path, *extra), runtime)
        assert isinstance(job.model, InstructBlip) == on
        batch = job.collate([job.dataset[(0, 0)], job.dataset[(0, 1)]])  # one image, two questions
        assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
        instruction = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
        assert bool(instruction) == on
        with torch.no_grad():
            embeds = job.model.eval().image_embeds(batch["pixel_values"])
            queries = job.model.language_model_inputs(embeds, **instruction)
        # One image in both rows: without the question the rows agree to rounding (a batch's rows
        # may round differently on some CPUs); with it, two questions move the queries by far more.
        if on:
            assert (queries[0] - queries[1]).abs().max() > 0.1
        else:
            assert_close(queries[0], queries[1])
    with pytest.raises(ValueError, match=r"model.question_to_qformer: the Q-Former of .* has no text path .*set "
                                         r"model.init_from"):
        build_job(vqa_config(vqa_setup, tmp_path, "--model.question_to_qformer", "true"), runtime)
    with pytest.raises(ValueError, match="model.question_to_qformer gives the VQA question to the Q-Former: it needs "
                                         "data.source vqa, not instructions"):
        vqa_config(vqa_setup, tmp_path, "--model.question_to_qformer", "true", "--data.source", "instructions")


def test_vqa_fine_tuning_with_the_question_and_the_image_encoder(vqa_setup, tmp_path):
    """BLIP-2's VQA recipe on tiny models: the question goes to the Q-Former (its text path from
    stage 1), the image encoder trains; the run evaluates and final/ gives back what trained."""
    run = tmp_path / "run"
    config = vqa_config(vqa_setup, run, "--model.question_to_qformer", "true", "--model.init_from",
                        str(vqa_setup[1]), "--model.freeze_vit", "false", "--eval_every", "2")
    result = train(config)
    assert 0 <= result["eval/accuracy"] <= 100 and result["eval/count"] == 8
    trained = weights(run, 2)
    assert "qformer.embeddings.word.weight" in trained and "vision.layers.0.attn.qkv.weight" in trained
    final = Blip2.from_pretrained(run / "final")
    assert isinstance(final, InstructBlip) and final.qformer_tokenizer is not None
    start = Blip2.from_pretrained(vqa_setup[0])
    assert not torch.equal(final.vision.layers[0].mlp.fc1.weight, start.vision.layers[0].mlp.fc1.weight)
    state = final.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key


def test_mixture_draws_in_proportion_to_the_square_root_of_the_sizes():
    """InstructBLIP, Section 2.4: p_d = sqrt(S_d) / sum sqrt(S_i), times a manual weight. Over
    n draws each frequency is within 5 standard errors sqrt(p (1 - p) / n) of p."""
    sizes = [100, 400, 2500]  # sqrt: 10, 20, 50
    for weights_, expected in ((None, [10 / 80, 20 / 80, 50 / 80]), ([2.0, 1.0, 0.5], [20 / 65, 20 / 65, 25 / 65])):
        mixture = SetMixture(sizes, weights_)
        assert mixture.probabilities == pytest.approx(expected)
        draws = torch.cat([mixture.order(torch.Generator().manual_seed(seed)) for seed in range(4)])  # 12,000
        counts = torch.bincount(torch.bucketize(draws, torch.tensor(mixture.starts[1:]), right=True), minlength=3)
        for count, p in zip(counts.tolist(), expected):
            assert abs(count / len(draws) - p) < 5 * math.sqrt(p * (1 - p) / len(draws))
    # within an epoch a set's samples repeat only once all of it has been drawn
    order = SetMixture([3, 1000]).order(torch.Generator().manual_seed(0))
    small = order[order < 3]
    assert len(small) > 3 and all(sorted(small[i : i + 3].tolist()) == [0, 1, 2] for i in range(0, len(small) - 2, 3))
    big = order[order >= 3]
    assert len(set(big.tolist())) == len(big)  # fewer draws than samples: none repeats


def test_mixed_batches_are_seeded_resumable_and_shared_by_ranks():
    mixture = SetMixture([5, 20, 45])
    one = GlobalBatchSampler(70, 4, seed=7, mixture=mixture)
    assert one.epoch_order(1) == GlobalBatchSampler(70, 4, seed=7, mixture=mixture).epoch_order(1)
    assert one.epoch_order(1) != one.epoch_order(2) != GlobalBatchSampler(70, 4, seed=8, mixture=mixture).epoch_order(2)
    one.set_position(1)
    whole = list(one)
    one.set_position(1, 5)
    assert list(one) == whole[5:]  # a resumed epoch goes on where it stopped
    ranks = [GlobalBatchSampler(70, 2, rank, 2, seed=7, mixture=mixture) for rank in (0, 1)]
    for sampler in ranks:
        sampler.set_position(1)
    assert [a + b for a, b in zip(*ranks)] == whole  # each rank its half of the one-process batch
    with pytest.raises(ValueError, match="the mixture covers 70 samples, the data set 69"):
        GlobalBatchSampler(69, 4, mixture=mixture)


def instruction_file(path: Path, images: list[str]) -> str:
    path.write_text("".join(json.dumps({"image": image, "instruction": "what colour is it", "answer": "red"}) + "\n"
                            for image in images))
    return str(path)


def test_instruction_sets_mix_in_the_trainer_or_fail_in_one_line(tmp_path):
    from qformer.train.data import MixedSets, file_sets

    Image.new("RGB", (28, 28), "red").save(tmp_path / "red.png")
    (tmp_path / "other").mkdir()
    Image.new("RGB", (28, 28), "blue").save(tmp_path / "other" / "blue.png")
    small = instruction_file(tmp_path / "small.jsonl", ["red.png"] * 4)
    large = instruction_file(tmp_path / "large.jsonl", ["blue.png"] * 16)

    def data(*sets: dict):
        return load_train_config(None, ["--model.stage", "stage2", "--data.source", "instructions",
                                        "--data.image_root", str(tmp_path), "--data.sets", json.dumps(list(sets))]).data

    train_set, _ = file_sets(data({"path": small}, {"path": large, "image_root": str(tmp_path / "other"),
                                                   "weight": 0.5}))
    assert isinstance(train_set, MixedSets) and len(train_set) == 20
    assert train_set.mixture.probabilities == pytest.approx([2 / 4, 2 / 4])  # sqrt 2 : 4 x 0.5
    assert train_set.read(19)["image"].getpixel((0, 0)) == (0, 0, 255) and train_set.read(19)["image_id"] == 19
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for sets, message in (([{"path": small}, {"path": str(empty)}], rf"data.sets\[1\].path: {empty} holds no sample"),
                          ([{"path": str(tmp_path / "nope.jsonl")}], r"data.sets\[0\].path: .*nope.jsonl is not a file"),
                          ([{"path": small, "image_root": "nowhere"}], r"data.sets\[0\].image_root: nowhere is not a")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            file_sets(data(*sets))
    with pytest.raises(ValueError, match="data.path and data.sets both name the training data"):
        load_train_config(None, ["--data.source", "instructions", "--data.path", small, "--data.sets",
                                 json.dumps([{"path": large}])])
    with pytest.raises(ValueError, match="data.sets mixes instruction data sets: it needs data.source instructions"):
        load_train_config(None, ["--data.source", "captions", "--data.sets", json.dumps([{"path": large}])])


@pytest.mark.numerics
def test_a_blip2_gets_its_qformer_text_path_from_bert_as_lavis_instructblip(minilm_path, vqa_setup, tmp_path):
    """InstructBlip.from_blip2: everything from the BLIP-2 (its towers shared), the word and
    position embeddings and text FFNs from the source; the prompt then steers the queries."""
    from qformer.config import Blip2Config
    from qformer.pretrained.qformer import QFormer
    from qformer.tokenizer import load_tokenizer
    from stage1_helpers import tiny_stage1_config
    from stage2_helpers import tiny_transformers_blip2

    bert = QFormer.from_bert(minilm_path, encoder_hidden_size=24)
    llm = tiny_transformers_blip2("opt").language_model
    qformer = bert.config.replace(use_text_input=False, use_lm_head=False, bos_token_id=None)
    config = Blip2Config(vision=tiny_stage1_config().vision, qformer=qformer, text_config=llm.config.to_dict(),
                         num_query_tokens=4)
    blip2 = Blip2(config, llm, tokenizer=tiny_tokenizer(add_bos=True))
    assert blip2.qformer.embeddings.word is None
    tokenizer = load_tokenizer(str(minilm_path), truncation_side="left")
    model = InstructBlip.from_blip2(blip2, bert, tokenizer)
    assert model.vision is blip2.vision and model.language_model is blip2.language_model
    ours, theirs, given = model.qformer.state_dict(), blip2.qformer.state_dict(), bert.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key] if key in theirs else given[key]), key
    assert "embeddings.word.weight" in ours and "layers.0.text_ffn.fc1.weight" in ours
    assert torch.equal(model.language_projection.weight, blip2.language_projection.weight)
    prompts = model.instruction(["what colour is it", "is it a ball"])
    with torch.no_grad():
        embeds = model.image_embeds(torch.rand(1, 3, IMAGE, IMAGE)).expand(2, -1, -1)
        queries = model.language_model_inputs(embeds, **prompts)
    assert not torch.allclose(queries[0], queries[1])
    with pytest.raises(ValueError, match=r"model.question_to_qformer: model.bert does not fit .*: its Q-Former is not "
                                         r"this one's shape: hidden_size 384 vs 32"):
        from qformer.train.stage2_job import build_model

        build_model(vqa_config(vqa_setup, tmp_path, "--model.question_to_qformer", "true", "--model.bert",
                               str(minilm_path)))

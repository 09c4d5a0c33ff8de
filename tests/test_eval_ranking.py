"""InstructBLIP's candidate-ranking evaluation (``qformer eval --task scienceqa|iconqa|vsr|hateful_memes``)
on tiny models and tiny fixtures in each set's official layout: every candidate's score is its
summed token log-likelihood from a plain forward of the LLM, the prediction the best of them,
whatever the candidates' order; the metric is accuracy, or for Hateful Memes the ROC AUC of
"yes"; an interrupted run resumes; a mistake is one line before the model loads."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from qformer.cli import main
from qformer.data.transforms import clean_caption, clean_question
from qformer.evaluate.ranking_tasks import roc_auc
from qformer.evaluate.runner import evaluate_benchmark
from qformer.pretrained.stage2 import Blip2
from stage2_helpers import save_tiny_blip2, tiny_tokenizer

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def plain_log_likelihood(model: Blip2, image: Path, prompt: str, candidate: str) -> float:
    """One candidate alone: [queries; prompt; candidate] through the LLM, no padding, no cache,
    the log-probabilities of the candidate's tokens summed."""
    tokenizer = model.tokenizer
    ids = tokenizer(candidate).input_ids
    ids = ids[1:] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else ids
    candidate_ids = torch.tensor([ids])
    prompt_ids = tokenizer([prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        pixels = model.preprocess([Image.open(image).convert("RGB")])
        queries = model.language_model_inputs(model.image_embeds(pixels), **model.instruction([prompt]))
        embed = model.language_model.get_input_embeddings()
        if model.is_encoder_decoder:
            logits = model.language_model(inputs_embeds=torch.cat([queries, embed(prompt_ids)], 1),
                                          labels=candidate_ids).logits[0]
        else:
            inputs = torch.cat([queries, embed(prompt_ids), embed(candidate_ids)], 1)
            logits = model.language_model(inputs_embeds=inputs).logits[0, -len(ids) - 1 : -1]
    return float(torch.log_softmax(logits, -1)[torch.arange(len(ids)), candidate_ids[0]].sum())


@pytest.fixture(scope="module")
def instructblip_llama(tmp_path_factory) -> Blip2:
    """A tiny InstructBLIP on LLaMA (its Q-Former reads the prompt), saved and loaded."""
    from test_instructblip import tiny_transformers_instructblip

    directory = tmp_path_factory.mktemp("instructblip-llama")
    tiny_transformers_instructblip("llama").save_pretrained(directory)
    tiny_tokenizer(add_bos=True).save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")
    return Blip2.from_pretrained(directory)


@pytest.fixture(scope="module")
def blip2_t5(tmp_path_factory) -> Blip2:
    directory = tmp_path_factory.mktemp("blip2-t5")
    save_tiny_blip2(directory, "t5")
    return Blip2.from_pretrained(directory)


PROMPTS = ["question : what colour is the ball answer :", "what is it", "is it a photo of a cat on the mat"]
CANDIDATES = [["red", "blue ball", "a photo of two dogs"], ["yes", "no"], ["cat", "dog on the mat", "tree", "car"]]


@pytest.mark.parametrize("which", ["blip2", "instructblip_llama", "blip2_t5"])
def test_each_score_is_the_summed_log_likelihood_of_a_plain_forward(which, request, tmp_path):
    """OPT (BLIP-2), LLaMA (InstructBLIP: the prompt goes to the Q-Former too), FlanT5-style
    T5: one batch of prompts of different lengths and candidates of different counts and lengths."""
    model = request.getfixturevalue(which)
    images = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(images):
        picture(path, i)
    scores = model.rank_candidates(images, PROMPTS, CANDIDATES)
    expected = [[plain_log_likelihood(model, image, prompt, c) for c in choices]
                for image, prompt, choices in zip(images, PROMPTS, CANDIDATES)]
    assert [len(s) for s in scores] == [3, 2, 4]
    assert_close(torch.tensor([x for s in scores for x in s]), torch.tensor([x for s in expected for x in s]),
                 rtol=1e-5, atol=1e-5)


def test_the_choice_does_not_depend_on_the_candidates_order(blip2, tmp_path):
    picture(tmp_path / "a.png", 0)
    forward = blip2.rank_candidates([tmp_path / "a.png"] * 2, PROMPTS[:2], [CANDIDATES[2], CANDIDATES[0]])
    backward = blip2.rank_candidates([tmp_path / "a.png"] * 2, PROMPTS[:2], [CANDIDATES[2][::-1], CANDIDATES[0][::-1]])
    for scores, reversed_scores, choices in zip(forward, backward, [CANDIDATES[2], CANDIDATES[0]]):
        assert_close(torch.tensor(reversed_scores[::-1]), torch.tensor(scores), rtol=1e-5, atol=1e-5)
        assert len(set(scores)) == len(scores)  # no tie: the scores alone decide
        assert choices[int(np.argmax(scores))] == choices[::-1][int(np.argmax(reversed_scores))]


def scienceqa_layout(root: Path) -> list[dict]:
    """problems.json, pid_splits.json and images/test/{pid}/image.png, as ScienceQA's download
    lays them out; one test problem has no image (not in ScienceQA-IMG), one is in train."""
    problems = {
        "11": {"question": "What colour is the ball?", "choices": ["red", "blue ball", "green"], "answer": 0,
               "hint": "", "image": "image.png", "split": "test"},
        "12": {"question": "What is on the mat?", "choices": ["a cat", "two dogs"], "answer": 1,
               "hint": "A photo of a cat.", "image": "image.png", "split": "test"},
        "13": {"question": "Is it a tree?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
               "split": "test"},
        "14": {"question": "What is it?", "choices": ["sky", "grass", "tree", "car"], "answer": 3, "hint": "the sky",
               "image": "image.png", "split": "test"},
        "15": {"question": "Train?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": "image.png",
               "split": "train"},
    }
    root.mkdir(parents=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["15"], "val": [], "test": ["11", "12", "13", "14"]}))
    for seed, pid in enumerate(("11", "12", "14")):
        picture(root / "images" / "test" / pid / "image.png", seed)
    return [dict(problems[pid], pid=pid) for pid in ("11", "12", "14")]


def test_scienceqa_ranks_the_choices_of_the_problems_with_an_image(blip2, blip2_dir, tmp_path, capsys):
    kept = scienceqa_layout(tmp_path / "scienceqa")
    out = tmp_path / "out"
    main(["eval", "--model", str(blip2_dir), "--device", "cpu", "--task", "scienceqa", "--data",
          str(tmp_path / "scienceqa"), "--out", str(out), "--batch-size", "2"])
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == ["11", "12", "14"]
    prompts = [(f"context: {p['hint']}. " if p["hint"] else "") + f"Question: {clean_question(p['question'])} "
               f"Options: {'; '.join(p['choices'])}. Answer:" for p in kept]
    images = [tmp_path / "scienceqa" / "images" / "test" / p["pid"] / "image.png" for p in kept]
    expected = blip2.rank_candidates(images, prompts, [p["choices"] for p in kept])
    for prediction, scores, problem in zip(predictions, expected, kept):
        assert_close(torch.tensor(prediction["prediction"]["log_likelihoods"]), torch.tensor(scores))
        assert prediction["prediction"]["answer"] == problem["choices"][int(np.argmax(scores))]
    right = sum(int(np.argmax(s)) == p["answer"] for s, p in zip(expected, kept))
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"] == round(100 * right / 3, 2) and results["count"] == 3
    settings = results["settings"]
    assert settings["prompt"] == "{context}Question: {question} Options: {options}. Answer:"
    assert "summed log-likelihood" in settings["ranking"] and len(settings["model_fingerprint"]) == 64
    assert f"scienceqa test: accuracy {results['accuracy']:.2f} over 3 questions" in capsys.readouterr().out


def iconqa_layout(root: Path) -> dict[str, dict]:
    problems = {"9": {"question": "What colour is the ball?", "choices": ["red", "blue"], "answer": 1},
                "10": {"question": "How many dogs?", "choices": ["two", "three", "a dog"], "answer": 0},
                "100": {"question": "What is it?", "choices": ["cat", "car"], "answer": 0}}
    for seed, (qid, problem) in enumerate(problems.items()):
        folder = root / "iconqa_data" / "iconqa" / "test" / "choose_txt" / qid
        picture(folder / "image.png", seed)
        (folder / "data.json").write_text(json.dumps({**problem, "ques_type": "choose_txt", "grade": "grade1"}))
    return problems


def test_iconqa_scores_accuracy_in_id_order(blip2, tmp_path):
    problems = iconqa_layout(tmp_path / "iconqa")
    results = evaluate_benchmark(blip2, "iconqa", tmp_path / "iconqa", tmp_path / "out", fingerprint="f")
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == ["9", "10", "100"]
    right = sum(p["prediction"]["answer"] == problems[p["question_id"]]["choices"][problems[p["question_id"]]["answer"]]
                for p in predictions)
    assert results["accuracy"] == round(100 * right / 3, 2)
    assert predictions[1]["prediction"]["answer"] in ("two", "three", "a dog")


def test_vsr_ranks_true_and_false(blip2_dir, tmp_path):
    """The tiny tokenizer does not know "true" and "false": a copy of the model learns them."""
    directory = tmp_path / "model"
    shutil.copytree(blip2_dir, directory)
    tokenizer = tiny_tokenizer(add_bos=True)
    tokenizer.add_tokens(["true", "false"])
    tokenizer.save_pretrained(directory)
    model = Blip2.from_pretrained(directory)
    root = tmp_path / "vsr"
    lines = [{"image": f"{i:012d}.jpg", "caption": caption, "label": label, "relation": "on"}
             for i, (caption, label) in enumerate([("The cat is on the mat.", 1), ("The car is under the tree.", 0),
                                                   ("The dog is on the ball.", 1)])]
    (root / "splits" / "zeroshot").mkdir(parents=True)
    (root / "splits" / "zeroshot" / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for i, line in enumerate(lines):
        picture(root / "images" / line["image"], i)
    results = evaluate_benchmark(model, "vsr", root, tmp_path / "out", fingerprint="f")
    prompts = [f'Based on the image, is this statement true or false? "{clean_caption(line["caption"])}" Answer:'
               for line in lines]
    expected = model.rank_candidates([root / "images" / line["image"] for line in lines], prompts,
                                     [["true", "false"]] * 3)
    right = sum((s[0] > s[1]) == (line["label"] == 1) for s, line in zip(expected, lines))
    assert all(s[0] != s[1] for s in expected)
    assert results["accuracy"] == round(100 * right / 3, 2) and results["count"] == 3


def hateful_memes_layout(root: Path, count: int = 6) -> list[dict]:
    words = ["a cat on the mat", "two dogs", "what is it", "red sky", "a blue car", "the tree", "green grass", "no"]
    lines = [{"id": 100 + i, "img": f"img/{100 + i}.png", "label": i % 2, "text": words[i % len(words)]}
             for i in range(count)]
    root.mkdir(parents=True)
    (root / "dev_seen.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for i, line in enumerate(lines):
        picture(root / line["img"], i)
    return lines


def pairs_auc(labels: list[int], scores: list[float]) -> float:
    """AUC by its definition: over every (hateful, not hateful) pair, 1 if the hateful one
    scores higher, 1/2 for a tie."""
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp == 1 for n, ln in zip(scores, labels) if ln == 0]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_hateful_memes_scores_the_auc_of_yes(blip2, tmp_path):
    lines = hateful_memes_layout(tmp_path / "hm")
    results = evaluate_benchmark(blip2, "hateful_memes", tmp_path / "hm", tmp_path / "out", fingerprint="f")
    prompts = [f'This is an image with: "{line["text"]}" written on it. Is it hateful? Answer:' for line in lines]
    expected = blip2.rank_candidates([tmp_path / "hm" / line["img"] for line in lines], prompts, [["yes", "no"]] * 6)
    yes = [math.exp(s[0]) / (math.exp(s[0]) + math.exp(s[1])) for s in expected]
    labels = [line["label"] for line in lines]
    assert results["auc"] == round(100 * pairs_auc(labels, yes), 2)
    assert results["accuracy"] == round(100 * sum((y > 0.5) == (lab == 1) for y, lab in zip(yes, labels)) / 6, 2)


def test_auc_counts_a_tie_as_half(monkeypatch):
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.9, 0.5, 0.3, 0.3, 0.1]  # by hand: 2.5 + 2 + 1.5 of 9 pairs rightly ordered
    assert roc_auc(labels, scores) == pytest.approx(6 / 9)
    assert roc_auc(labels, scores) == pytest.approx(pairs_auc(labels, scores))
    with pytest.raises(ValueError, match="needs both labels"):
        roc_auc([1, 1], [0.2, 0.4])
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # as without scikit-learn
    with pytest.raises(ValueError, match=r"needs scikit-learn: pip install 'qformer\[eval\]'"):
        roc_auc(labels, scores)


def test_an_interrupted_run_asks_only_the_unanswered(blip2, tmp_path, monkeypatch):
    hateful_memes_layout(tmp_path / "hm", count=5)
    out = tmp_path / "out"
    whole = evaluate_benchmark(blip2, "hateful_memes", tmp_path / "hm", out, batch_size=2, fingerprint="f")
    first = (out / "predictions.json").read_text()
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # stopped while writing line 3
    (out / "results.json").unlink()
    asked = []
    original = Blip2.rank_candidates
    monkeypatch.setattr(Blip2, "rank_candidates", lambda self, images, prompts, candidates: asked.extend(prompts)
                        or original(self, images, prompts, candidates))
    again = evaluate_benchmark(blip2, "hateful_memes", tmp_path / "hm", out, batch_size=2, fingerprint="f")
    assert len(asked) == 3 and all(text in asked[0] for text in ("what is it", "written on it"))
    assert (out / "predictions.json").read_text() == first and again["auc"] == whole["auc"]
    with pytest.raises(ValueError, match=r"other settings \(prompt differ\)"):
        evaluate_benchmark(blip2, "hateful_memes", tmp_path / "hm", out, prompt="Is {text} hateful?", fingerprint="f")


@pytest.mark.parametrize(("task", "arguments", "words"), [
    ("scienceqa", [], "problems.json not found"),
    ("iconqa", [], "iconqa_data/iconqa/test/choose_txt not found"),
    ("vsr", ["--split", "dev"], "splits/zeroshot/dev.jsonl not found"),
    ("hateful_memes", ["--split", "test_seen"], "test_seen.jsonl not found"),
    ("vsr", ["--prompt", "Is {} true?"], "--prompt 'Is {} true?': vsr's prompt takes {caption} ({caption} needed)"),
    ("iconqa", ["--num-beams", "3"], "--num-beams goes with a generating task, not iconqa"),
    ("hateful_memes", ["--split", "train"], "--split 'train': hateful_memes has dev_seen, test_seen"),
])
def test_a_mistake_is_one_line_before_the_model_loads(blip2_dir, tmp_path, monkeypatch, capsys, task, arguments,
                                                       words):
    monkeypatch.setattr(Blip2, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(blip2_dir), "--device", "cpu", "--task", task, "--data", str(tmp_path),
              *arguments])
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and words in error and len(error.strip().splitlines()) == 1


def test_a_malformed_problem_is_named(blip2, tmp_path):
    root = tmp_path / "scienceqa"
    scienceqa_layout(root)
    problems = json.loads((root / "problems.json").read_text())
    problems["12"]["answer"] = 5
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=r"problem 12: 'answer' should be the index of one of its 2 choices"):
        evaluate_benchmark(blip2, "scienceqa", root, tmp_path / "out")

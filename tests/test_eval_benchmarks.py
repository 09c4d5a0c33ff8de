"""``qformer eval --model M --task T --data ROOT`` on tiny fixtures in each benchmark's official
layout: the answers are the model's under BLIP-2's prompt and settings, the metric is the official
one, an interrupted run resumes, other settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stage2_helpers import save_tiny_blip2

from qformer.blip2 import Blip2
from qformer.cli import main
from qformer.data.transforms import clean_question
from qformer.evaluate.benchmarks import GENERATION
from qformer.evaluate.runner import evaluate_benchmark
from qformer.evaluate.vqa import normalize_answer, vqa_score

QUESTIONS = ["What colour is the ball?", "How many dogs are there?", "Is it raining?", "What is on the TABLE?",
             "Where is the cat?"]
ANSWERS = [["red"] * 6 + ["orange"] * 4, ["2"] * 5 + ["two"] * 3 + ["3"] * 2, ["no"] * 10, ["grass"] * 3 + ["it"] * 7,
           ["on the mat"] * 4 + ["mat"] * 6]


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def vqa_layout(root: Path, questions_name: str, annotations_name: str | None, folder: str) -> Path:
    """The VQA challenge's files: questions, annotations (ten answers each), COCO-named images."""
    image_ids = [9, 9, 42, 139, 285]
    questions = [{"image_id": image, "question": q, "question_id": 1000 + i}
                 for i, (image, q) in enumerate(zip(image_ids, QUESTIONS))]
    (root / questions_name).parent.mkdir(parents=True, exist_ok=True)
    (root / questions_name).write_text(json.dumps({"questions": questions, "data_subtype": folder}))
    if annotations_name is not None:
        annotations = [{"question_id": 1000 + i, "image_id": image, "question_type": "what", "answer_type":
                        "number" if i == 1 else "other",
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                    for j, a in enumerate(answers)]}
                       for i, (image, answers) in enumerate(zip(image_ids, ANSWERS))]
        (root / annotations_name).write_text(json.dumps({"annotations": annotations}))
    for image in set(image_ids):
        picture(root / folder / f"COCO_{folder}_{image:012d}.jpg", image)
    return root


def run(blip2_dir: Path, *arguments: str) -> None:
    main(["eval", "--model", str(blip2_dir), "--device", "cpu", *arguments])


def expected_answers(model: Blip2, root: Path, folder: str, prompt: str = "Question: {} Answer:") -> list[str]:
    image_ids = [9, 9, 42, 139, 285]
    images = [Image.open(root / folder / f"COCO_{folder}_{i:012d}.jpg").convert("RGB") for i in image_ids]
    prompts = [prompt.format(clean_question(q)) for q in QUESTIONS]
    return model.generate_text(images, prompts, **GENERATION)


def test_vqav2_answers_and_scores_as_blip2_and_the_official_script(blip2, blip2_dir, tmp_path, capsys):
    root = vqa_layout(tmp_path / "vqav2", "v2_OpenEnded_mscoco_val2014_questions.json",
                      "v2_mscoco_val2014_annotations.json", "val2014")
    out = tmp_path / "out"
    run(blip2_dir, "--task", "vqav2", "--data", str(root), "--out", str(out), "--batch-size", "2")
    printed = capsys.readouterr().out
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [1000 + i for i in range(5)]
    assert [p["answer"] for p in predictions] == expected_answers(blip2, root, "val2014")
    results = json.loads((out / "results.json").read_text())
    assert results["vqa_accuracy"] == vqa_score([p["answer"] for p in predictions], ANSWERS)["accuracy"]
    assert set(results["per_answer_type"]) == {"number", "other"} and results["count"] == 5
    settings = results["settings"]
    assert settings["prompt"] == "Question: {} Answer:" and settings["generation"] == GENERATION
    assert len(settings["model_fingerprint"]) == 64 and settings["split"] == "val2014"
    assert f"vqa_accuracy {results['vqa_accuracy']:.2f} over 5 questions" in printed


def test_an_interrupted_run_resumes_and_other_settings_are_refused(blip2, blip2_dir, tmp_path, monkeypatch):
    root = vqa_layout(tmp_path / "okvqa", "OpenEnded_mscoco_val2014_questions.json",
                      "mscoco_val2014_annotations.json", "val2014")
    out = tmp_path / "out"
    whole = evaluate_benchmark(blip2, "okvqa", root, out, batch_size=2, fingerprint="f")
    first = (out / "predictions.json").read_text()
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:9])  # stopped while writing line 3
    (out / "results.json").unlink()
    asked = []
    original = Blip2.generate_text
    monkeypatch.setattr(Blip2, "generate_text", lambda self, images, prompts, **kw: asked.extend(prompts)
                        or original(self, images, prompts, **kw))
    again = evaluate_benchmark(blip2, "okvqa", root, out, batch_size=2, fingerprint="f")
    assert len(asked) == 3  # the 2 answered questions are not asked again
    assert (out / "predictions.json").read_text() == first and again["vqa_accuracy"] == whole["vqa_accuracy"]
    with pytest.raises(ValueError, match=r"other settings \(prompt differ\)"):
        evaluate_benchmark(blip2, "okvqa", root, out, prompt="Q: {} A:", fingerprint="f")
    with pytest.raises(ValueError, match=r"other settings \(generation, model_fingerprint differ\)"):
        evaluate_benchmark(blip2, "okvqa", root, out, fingerprint="g", num_beams=2)


def test_gqa_is_exact_match_of_the_cleaned_prediction(blip2, blip2_dir, tmp_path):
    root = tmp_path / "gqa"
    entries = {f"20{i}": {"imageId": f"n{i}", "question": q, "answer": answers[0]}
               for i, (q, answers) in enumerate(zip(QUESTIONS, ANSWERS))}
    root.mkdir()
    (root / "testdev_balanced_questions.json").write_text(json.dumps(entries))
    for i in range(5):
        picture(root / "images" / f"n{i}.jpg", i)
    out = tmp_path / "out"
    run(blip2_dir, "--task", "gqa", "--data", str(root), "--out", str(out))
    predictions = {p["question_id"]: p["answer"] for p in json.loads((out / "predictions.json").read_text())}
    expected = sum(normalize_answer(predictions[qid]) == e["answer"] for qid, e in entries.items()) / 5
    assert json.loads((out / "results.json").read_text())["accuracy"] == round(100 * expected, 2)


def test_test_dev_writes_predictions_for_the_server(blip2_dir, tmp_path):
    root = vqa_layout(tmp_path / "vqav2", "v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015")
    out = tmp_path / "out"
    run(blip2_dir, "--task", "vqav2", "--split", "test-dev2015", "--data", str(root), "--out", str(out))
    assert len(json.loads((out / "predictions.json").read_text())) == 5
    assert "evaluation server" in json.loads((out / "results.json").read_text())["note"]


@pytest.mark.parametrize(("arguments", "words"), [
    (["--task", "vqav2"], "--model needs --task and --data"),
    (["--task", "textvqa", "--data", "."], "--task 'textvqa': one of vqav2, okvqa, gqa, coco_caption, nocaps, "
                                            "flickr_caption, scienceqa, iconqa, vsr, hateful_memes, coco_retrieval, "
                                            "flickr_retrieval"),
    (["--task", "gqa", "--data", "nowhere"], "testdev_balanced_questions.json not found"),
    (["--task", "okvqa", "--data", ".", "--split", "test"], "--split 'test': okvqa has val2014"),
])
def test_mistakes_are_one_line(blip2_dir, arguments, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(blip2_dir, *arguments)
    assert exit_.value.code == 1 and words in capsys.readouterr().err


def test_flan_t5_gets_the_short_answer_prompt(tmp_path):
    directory = tmp_path / "t5"
    save_tiny_blip2(directory, "t5")
    root = vqa_layout(tmp_path / "okvqa", "OpenEnded_mscoco_val2014_questions.json",
                      "mscoco_val2014_annotations.json", "val2014")
    results = evaluate_benchmark(Blip2.from_pretrained(directory), "okvqa", root, tmp_path / "out", limit=2)
    assert results["settings"]["prompt"] == "Question: {} Short answer:" and results["count"] == 2


def test_coco_retrieval_recalls_as_blip2_retrieves(tmp_path, minilm_path, capsys):
    """A stage-1 model on LAVIS's Karpathy test layout: every image against every caption, k = 128."""
    import torch
    from stage1_helpers import usable_stage1

    from qformer import load_tokenizer
    from qformer.data.transforms import clean_caption, eval_image
    from qformer.retrieval import retrieval_recall, retrieval_scores, tokenize

    stage1 = usable_stage1(load_tokenizer(minilm_path))
    stage1.save_pretrained(tmp_path / "s1")
    root = tmp_path / "coco"
    entries = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [f"A photo of thing {i}.", f"thing {i}!"]}
               for i in range(4)]
    for i in range(4):
        picture(root / entries[i]["image"], i)
    (root / "coco_karpathy_test.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    main(["eval", "--model", str(tmp_path / "s1"), "--device", "cpu", "--task", "coco_retrieval", "--data", str(root),
          "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    model = type(stage1).from_pretrained(tmp_path / "s1")
    pixels = torch.stack([eval_image(root / e["image"], model.config.image) for e in entries])
    ids, mask = tokenize(model, [clean_caption(c) for e in entries for c in e["caption"]])
    i2t, t2i = retrieval_scores(model, model.image_embeds(pixels), ids, mask, k=128)
    expected = retrieval_recall(i2t, t2i, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert {key: results[key] for key in expected} == {key: round(value, 2) for key, value in expected.items()}
    assert results["settings"]["k"] == 128 and results["count"] == 4
    assert "coco_retrieval: txt_r1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "s1"), "--task", "coco_retrieval", "--data", str(root), "--prompt", "x"])
    assert "--prompt goes with a question-answering task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "s1"), "--task", "vqav2", "--data", str(root)])
    assert "holds a stage-1 model (image-text matching, no LLM)" in capsys.readouterr().err


CAPTIONS = [["a red ball on the grass", "a ball that is red"], ["two dogs play", "dogs playing in a park"],
            ["a cat on a mat", "the cat sleeps"], ["a table with food", "food on a wooden table"]]


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="pycocoevalcap's tokenizer runs on Java")
def test_coco_and_nocaps_captions_score_as_pycocoevalcap(blip2, blip2_dir, tmp_path):
    from qformer.evaluate.benchmarks import CAPTION_GENERATION
    from qformer.evaluate.captions import caption_metrics, spice_unavailable

    coco = tmp_path / "coco"
    entries = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": refs} for i, refs in enumerate(CAPTIONS)]
    for i, entry in enumerate(entries):
        picture(coco / entry["image"], i)
    (coco / "coco_karpathy_test.json").write_text(json.dumps(entries))
    out = tmp_path / "coco-out"
    run(blip2_dir, "--task", "coco_caption", "--data", str(coco), "--out", str(out))
    predictions = json.loads((out / "predictions.json").read_text())
    images = [Image.open(coco / e["image"]).convert("RGB") for e in entries]
    expected = blip2.generate_text(images, ["a photo of"] * 4, **CAPTION_GENERATION)
    assert [p["caption"] for p in predictions] == expected and [p["image_id"] for p in predictions] == \
        [e["image"] for e in entries]
    results = json.loads((out / "results.json").read_text())
    metrics = caption_metrics(dict(enumerate(expected)), dict(enumerate(CAPTIONS)))
    assert {k: results[k] for k in metrics} == {k: round(100 * v, 2) for k, v in metrics.items()}

    nocaps = tmp_path / "nocaps"
    domains = ["in-domain", "near-domain", "out-domain", "near-domain"]
    data = {"images": [{"id": i, "file_name": f"{i:04x}.jpg", "domain": d} for i, d in enumerate(domains)],
            "annotations": [{"image_id": i, "caption": c} for i, refs in enumerate(CAPTIONS) for c in refs]}
    for i in range(4):
        picture(nocaps / "images" / f"{i:04x}.jpg", i)
    (nocaps / "nocaps_val_4500_captions.json").write_text(json.dumps(data))
    results = evaluate_benchmark(blip2, "nocaps", nocaps, tmp_path / "nocaps-out", fingerprint="f")
    near = [1, 3]
    near_cider = caption_metrics({i: expected[i] for i in near}, {i: CAPTIONS[i] for i in near}, ("CIDEr",))["CIDEr"]
    assert results["CIDEr_per_domain"]["near-domain"] == round(100 * near_cider, 2)
    assert set(results["CIDEr_per_domain"]) == set(domains)
    skipped = spice_unavailable()  # SPICE needs Stanford CoreNLP's jars, which nothing here downloads
    assert results["SPICE"] == f"skipped: {skipped}" if skipped else isinstance(results["SPICE"], float)


def test_two_processes_answer_as_one(blip2_dir, tmp_path):
    """Under torchrun each rank answers its share; the gathered predictions and figures equal one
    process's."""
    import os
    import subprocess
    import sys

    root = vqa_layout(tmp_path / "okvqa", "OpenEnded_mscoco_val2014_questions.json",
                      "mscoco_val2014_annotations.json", "val2014")
    arguments = ["-m", "qformer", "eval", "--model", str(blip2_dir), "--device", "cpu", "--task", "okvqa",
                 "--data", str(root), "--batch-size", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    one = subprocess.run([sys.executable, *arguments, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *arguments, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert sorted(p.name for p in (tmp_path / "two").glob("predictions*.jsonl")) == [
        "predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    for name in ("predictions.json",):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    figures = [json.loads((tmp_path / side / "results.json").read_text()) for side in ("one", "two")]
    assert figures[0]["vqa_accuracy"] == figures[1]["vqa_accuracy"] and figures[1]["count"] == 5
    assert two.stdout.count("okvqa val2014:") == 1  # printed by rank 0 alone

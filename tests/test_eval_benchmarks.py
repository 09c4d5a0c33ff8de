"""``qformer eval --model M --task T --data ROOT`` on tiny fixtures in each benchmark's official
layout: the answers are the model's under BLIP-2's prompt and settings, the metric is the official
one, an interrupted run resumes, other settings are refused."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer.cli import main
from qformer.data.transforms import clean_question
from qformer.evaluate.retrieval_tasks import evaluate_retrieval_task
from qformer.evaluate.runner import evaluate_benchmark
from qformer.evaluate.tasks import GENERATION
from qformer.evaluate.vqa import normalize_answer, vqa_score
from qformer.pretrained.stage2 import Blip2
from stage2_helpers import save_tiny_blip2

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
    run(blip2_dir, "--task", "gqa", "--data", str(root), "--out", str(out), "--generate", "length_penalty=0",
        "--generate", "repetition_penalty=1.5")
    predictions = {p["question_id"]: p["answer"] for p in json.loads((out / "predictions.json").read_text())}
    expected = sum(normalize_answer(predictions[qid]) == e["answer"] for qid, e in entries.items()) / 5
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"] == round(100 * expected, 2)
    assert results["settings"]["generation"] == {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1,
                                                 "length_penalty": 0, "repetition_penalty": 1.5}


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
    (["--task", "okvqa", "--data", ".", "--generate", "beams"], "--generate 'beams': write KEY=VALUE"),
    (["--task", "okvqa", "--data", ".", "--generate", "beam_width=3"], "--generate beam_width: not an option"),
    (["--task", "iconqa", "--data", ".", "--generate", "top_k=3"], "--generate goes with a generating task"),
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


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory, minilm_path):
    """A tiny stage-1 model saved and loaded, LAVIS's Karpathy test layout (6 images, 2 captions
    each) and a whole evaluation of it (features and re-ranking in chunks of 2) to compare with."""
    from types import SimpleNamespace

    from qformer import load_tokenizer
    from qformer.loading import model_fingerprint
    from qformer.pretrained.stage1 import Blip2Stage1
    from stage1_helpers import usable_stage1

    tmp = tmp_path_factory.mktemp("retrieval")
    usable_stage1(load_tokenizer(minilm_path)).save_pretrained(tmp / "s1")
    root = tmp / "coco"
    entries = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [f"A photo of thing {i}.", f"thing {i}!"]}
               for i in range(6)]
    for i, entry in enumerate(entries):
        picture(root / entry["image"], i)
    (root / "coco_karpathy_test.json").write_text(json.dumps(entries))
    model, fingerprint = Blip2Stage1.from_pretrained(tmp / "s1"), model_fingerprint(tmp / "s1")
    results = evaluate_retrieval_task(model, "coco_retrieval", root, tmp / "whole", batch_size=2, chunk_size=2,
                                      fingerprint=fingerprint)
    return SimpleNamespace(directory=tmp / "s1", model=model, fingerprint=fingerprint, root=root, entries=entries,
                           whole=tmp / "whole", results=results)


def read_scores(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "scores.safetensors")


def assert_same_scores(out: Path, reference: Path) -> None:
    from torch.testing import assert_close

    got, expected = read_scores(out), read_scores(reference)
    assert got.keys() == expected.keys() == {"i2t_texts", "i2t_scores", "t2i_images", "t2i_scores"}
    for name in expected:
        assert_close(got[name], expected[name])


def test_coco_retrieval_recalls_as_blip2_retrieves(retrieval, tmp_path, capsys):
    """``qformer eval --task coco_retrieval``: every image against every caption, k = 128, the
    scores and recall of retrieval_scores in memory; a changed model is refused in one line."""
    import torch
    from torch.testing import assert_close

    from qformer.data.transforms import clean_caption, eval_image
    from qformer.pretrained.stage1 import tokenize
    from qformer.retrieval import retrieval_recall, retrieval_scores

    out = tmp_path / "out"
    main(["eval", "--model", str(retrieval.directory), "--device", "cpu", "--task", "coco_retrieval", "--data",
          str(retrieval.root), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    model = retrieval.model
    pixels = torch.stack([eval_image(retrieval.root / e["image"], model.config.image) for e in retrieval.entries])
    ids, mask = tokenize(model, [clean_caption(c) for e in retrieval.entries for c in e["caption"]])
    i2t, t2i = retrieval_scores(model, model.image_embeds(pixels), ids, mask, k=128)
    expected = retrieval_recall(i2t, t2i, torch.tensor([i // 2 for i in range(12)]))
    assert {key: results[key] for key in expected} == {key: round(value, 2) for key, value in expected.items()}
    assert results["settings"]["k"] == 128 and results["count"] == 6
    scores = read_scores(out)
    assert_close(scores["i2t_scores"], i2t.gather(1, scores["i2t_texts"]))
    assert_close(scores["t2i_scores"], t2i.gather(1, scores["t2i_images"]))
    assert "coco_retrieval: txt_r1" in capsys.readouterr().out
    assert_same_scores(retrieval.whole, out)  # chunks of 2 (the fixture's) score as chunks of 256

    type(model).from_pretrained(retrieval.directory).save_pretrained(tmp_path / "s1-again")  # another fingerprint
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "s1-again"), "--task", "coco_retrieval", "--data",
              str(retrieval.root), "--features", str(out), "--out", str(tmp_path / "again")])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds features computed with other settings (model_fingerprint differ)" in error
    assert not (tmp_path / "again").exists()
    for arguments, words in ((["--prompt", "x"], "--prompt goes with a question-answering task"),
                             (["--task", "vqav2", "--features", "f"], "--features goes with a retrieval task")):
        with pytest.raises(SystemExit):
            main(["eval", "--model", str(retrieval.directory), "--task", "coco_retrieval", "--data",
                  str(retrieval.root), *arguments])
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(retrieval.directory), "--task", "vqav2", "--data", str(retrieval.root)])
    assert "holds a stage-1 model (image-text matching, no LLM)" in capsys.readouterr().err


class Calls:
    """Counts the calls of a method or function, and raises at call number ``fail_at``."""

    def __init__(self, monkeypatch, owner, name: str, fail_at: int | None = None) -> None:
        self.count, self.original, self.fail_at = 0, getattr(owner, name), fail_at
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        self.count += 1
        if self.count == self.fail_at:
            raise RuntimeError("stopped by the test")
        return self.original(*args, **kwargs)

    def __get__(self, instance, owner=None):  # as a method
        return self if instance is None else functools.partial(self, instance)


def interrupted_feature_phase(retrieval, out: Path, monkeypatch) -> None:
    """An evaluation stopped while encoding its second chunk of images: one image chunk on disk."""
    with monkeypatch.context() as patch:
        Calls(patch, type(retrieval.model), "encode_image", fail_at=2)
        with pytest.raises(RuntimeError, match="stopped by the test"):
            evaluate_retrieval_task(retrieval.model, "coco_retrieval", retrieval.root, out, batch_size=2, chunk_size=2,
                                    fingerprint=retrieval.fingerprint)
    assert sorted(p.name for p in (out / "features").glob("*.safetensors")) == ["images-00000.safetensors"]


def test_an_interrupted_retrieval_evaluation_computes_only_what_is_missing(retrieval, tmp_path, monkeypatch):
    from qformer.evaluate import retrieval_tasks

    out, model = tmp_path / "out", retrieval.model
    interrupted_feature_phase(retrieval, out, monkeypatch)
    first = (out / "features" / "images-00000.safetensors").stat().st_mtime_ns
    with monkeypatch.context() as patch:  # resumed, and stopped again in the second re-rank chunk
        images = Calls(patch, type(model), "encode_image")
        texts = Calls(patch, type(model), "text_pass")
        Calls(patch, retrieval_tasks, "itm_of_images", fail_at=2)
        with pytest.raises(RuntimeError, match="stopped by the test"):
            evaluate_retrieval_task(model, "coco_retrieval", retrieval.root, out, batch_size=2, chunk_size=2,
                                    fingerprint=retrieval.fingerprint)
    assert (images.count, texts.count) == (2, 6)  # the 2 missing image chunks (batch 2), the 6 text chunks
    assert (out / "features" / "images-00000.safetensors").stat().st_mtime_ns == first
    assert [p.name for p in (out / "rerank").glob("*.safetensors")] == ["itm-00000.safetensors"]
    with monkeypatch.context() as patch:
        images = Calls(patch, type(model), "encode_image")
        texts = Calls(patch, type(model), "text_pass")
        rerank = Calls(patch, retrieval_tasks, "itm_of_images")
        results = evaluate_retrieval_task(model, "coco_retrieval", retrieval.root, out, batch_size=2, chunk_size=2,
                                          fingerprint=retrieval.fingerprint)
    assert (images.count, texts.count, rerank.count) == (0, 0, 2)
    assert results == {**retrieval.results, "settings": {**retrieval.results["settings"],
                                                         "features": str((out / "features").resolve())}}
    assert_same_scores(out, retrieval.whole)

    with pytest.raises(ValueError, match=r"other settings \(model_fingerprint differ\): pass another --features"):
        evaluate_retrieval_task(model, "coco_retrieval", retrieval.root, out, chunk_size=2, fingerprint="another")
    with pytest.raises(ValueError, match=r"other settings \(images, captions, data_digest differ\)"):
        evaluate_retrieval_task(model, "coco_retrieval", retrieval.root, out, chunk_size=2, limit=4,
                                fingerprint=retrieval.fingerprint)
    with pytest.raises(ValueError, match=r"holds predictions made with other settings \(k differ\)"):
        evaluate_retrieval_task(model, "coco_retrieval", retrieval.root, out, k=10, chunk_size=2,
                                fingerprint=retrieval.fingerprint)


def test_precomputed_features_serve_another_k_without_the_image_encoder(retrieval, tmp_path, monkeypatch):
    """An earlier evaluation's features, reused for k = 10: no image or text encoded, the scores of
    retrieval_scores(k=10)."""
    import torch
    from torch.testing import assert_close

    from qformer.data.transforms import clean_caption, eval_image
    from qformer.pretrained.stage1 import tokenize
    from qformer.retrieval import retrieval_recall, retrieval_scores

    model = retrieval.model
    with monkeypatch.context() as patch:
        images = Calls(patch, type(model), "encode_image")
        texts = Calls(patch, type(model), "text_pass")
        queries = Calls(patch, type(model), "query_pass")
        results = evaluate_retrieval_task(model, "coco_retrieval", retrieval.root, tmp_path / "k10", k=10,
                                          batch_size=2, chunk_size=2, fingerprint=retrieval.fingerprint,
                                          features=retrieval.whole)
    assert (images.count, texts.count, queries.count) == (0, 0, 0)
    assert results["settings"]["features"] == str((retrieval.whole / "features").resolve())
    pixels = torch.stack([eval_image(retrieval.root / e["image"], model.config.image) for e in retrieval.entries])
    ids, mask = tokenize(model, [clean_caption(c) for e in retrieval.entries for c in e["caption"]])
    i2t, t2i = retrieval_scores(model, model.image_embeds(pixels), ids, mask, k=10)
    expected = retrieval_recall(i2t, t2i, torch.tensor([i // 2 for i in range(12)]), k=10)
    assert {key: results[key] for key in expected} == {key: round(value, 2) for key, value in expected.items()}
    scores = read_scores(tmp_path / "k10")
    assert scores["i2t_texts"].shape == (6, 10) and scores["t2i_images"].shape == (12, 6)
    assert_close(scores["i2t_scores"], i2t.gather(1, scores["i2t_texts"]))
    assert_close(scores["t2i_scores"], t2i.gather(1, scores["t2i_images"]))


CAPTIONS = [["a red ball on the grass", "a ball that is red"], ["two dogs play", "dogs playing in a park"],
            ["a cat on a mat", "the cat sleeps"], ["a table with food", "food on a wooden table"]]


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="pycocoevalcap's tokenizer runs on Java")
@pytest.mark.usefixtures("one_meteor_jar")  # the evaluations' METEOR and the expected one from one running jar
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


def test_two_ranks_finish_a_retrieval_evaluation_as_one_process(retrieval, tmp_path, monkeypatch):
    """One process stops after one image chunk; torchrun with 2 ranks resumes it, each rank computing
    its share of the missing chunks and of the re-ranking: the scores and figures of one process."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    out = tmp_path / "out"
    interrupted_feature_phase(retrieval, out, monkeypatch)
    first = (out / "features" / "images-00000.safetensors").stat().st_mtime_ns
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "qformer", "eval", "--model", str(retrieval.directory), "--device", "cpu",
                          "--task", "coco_retrieval", "--data", str(retrieval.root), "--batch-size", "2",
                          "--chunk-size", "2", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("coco_retrieval: txt_r1") == 1  # printed by rank 0 alone
    results = json.loads((out / "results.json").read_text())
    assert {key: value for key, value in results.items() if key != "settings"} == \
        {key: value for key, value in retrieval.results.items() if key != "settings"}
    assert_same_scores(out, retrieval.whole)
    assert (out / "features" / "images-00000.safetensors").stat().st_mtime_ns == first  # not computed again

    def writers(paths: list[Path]) -> list[str]:
        ranks = []
        for path in paths:
            with safe_open(path, framework="pt") as file:
                ranks.append(file.metadata()["rank"])
        return ranks

    features = sorted((out / "features").glob("*.safetensors"))[1:]  # images 1-2, texts 0-5: missing at the resume
    assert writers(features) == ["0", "1", "0", "1", "0", "1", "0", "1"]  # every other missing chunk, in order
    assert writers(sorted((out / "rerank").glob("*.safetensors"))) == ["0", "1", "0"]

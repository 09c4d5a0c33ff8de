"""A new user's first hour with the commands (issue #27): a file that is not a checkpoint, a
training run given where a model is asked for, a LAVIS file converted back, a stage-1 model's
captions on the command line and on the server, an argument refused before the work, and help
and results that say where things are."""

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from qformer import load_tokenizer
from qformer.cli import main
from qformer.retrieval import caption_texts
from qformer.serve.app import create_app
from qformer.serve.limits import Limits
from qformer.serve.service import ServedModel
from serve_helpers import png_bytes, running
from stage1_helpers import usable_stage1

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def qformer(*arguments: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "qformer", *arguments], capture_output=True, text=True, timeout=300)


def one_line(out: subprocess.CompletedProcess, command: str) -> str:
    """The single line a refused command prints, without its ``qformer COMMAND: `` prefix."""
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"qformer {command}: "), out.stderr
    return out.stderr.removeprefix(f"qformer {command}: ").strip()


@pytest.fixture(scope="module")
def stage1(minilm_path):
    return usable_stage1(load_tokenizer(minilm_path))


@pytest.fixture(scope="module")
def run(tmp_path_factory, stage1) -> Path:
    """A training run's folder as qformer train leaves it: its recipe, a step checkpoint, final/."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text("model: {stage: stage1}\n")
    (run / "step_0000002").mkdir()
    (run / "step_0000002" / "trainable.safetensors").write_bytes(b"")
    stage1.save_pretrained(run / "final")
    Image.open(io.BytesIO(png_bytes())).save(run.parent / "photo.png")
    return run


def test_convert_names_a_file_that_is_not_a_checkpoint(tmp_path):
    """Item 3: a text file named .pth and a non-image .jpg fail in one line naming the file, not
    with the byte torch's reader stumbled on (``qformer convert: 105``)."""
    for name in ("fake.pth", "notimage.jpg"):
        (tmp_path / name).write_text("hello, world\n")
        message = one_line(qformer("convert", str(tmp_path / name), str(tmp_path / "out")), "convert")
        assert message.startswith(f"{tmp_path / name} is not a torch checkpoint"), message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["caption", "vqa", "retrieve", "eval", "serve"])
def test_a_step_checkpoint_is_refused_alike_naming_export(command, run, capsys):
    """Item 4: every command that takes --model reads a training run's folders by one rule
    (find_model's): a step checkpoint is not a model, and the line says how it becomes one."""
    step = str(run / "step_0000002")
    arguments = {
        "caption": ["caption", "--model", step, "x.png"],
        "vqa": ["vqa", "--model", step, "--question", "what?", "x.png"],
        "retrieve": ["retrieve", "--model", step, "--images", "x.png", "--query", "x"],
        "eval": ["eval", "--model", step, "--task", "vqav2", "--data", str(run)],
        "serve": ["serve", "--model", step],
    }[command]
    with pytest.raises(SystemExit):
        main([*arguments, "--device", "cpu"])
    err = capsys.readouterr().err
    assert err == (f"qformer {command}: {step} is a training checkpoint, not a model: pass the run's final/, or "
                   f"write this checkpoint as a model with qformer export {step} OUT and pass OUT\n")


def test_a_run_folder_means_its_final_for_caption_and_retrieve(run, stage1, capsys):
    """Item 4: caption (in its own process) and retrieve on a run folder answer with its final/,
    as eval and export take a run folder; a run with no final/ yet names qformer export."""
    photo = run.parent / "photo.png"
    out = qformer("caption", "--model", str(run), str(photo), "--device", "cpu", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{photo}\t{caption_texts(stage1, [str(photo)], max_new_tokens=4)[0]}\n"
    main(["retrieve", "--model", str(run), "--images", str(photo), "--query", "a photo", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["image"] == str(photo)
    (run.parent / "unfinished").mkdir()
    (run.parent / "unfinished" / "config.yaml").write_text("model: {stage: stage1}\n")
    message = one_line(qformer("serve", "--model", str(run.parent / "unfinished")), "serve")
    assert "is a training run with no final/ yet" in message and "qformer export" in message


def test_lavis_round_trip_is_told_in_few_lines_and_a_missing_tokenizer_in_cli_words(run, minilm_path, tmp_path,
                                                                                     capsys):
    """Item 5: back from LAVIS without --config is one line (not one per key); the report says
    "dropped" once; the model LAVIS gave no tokenizer is refused by retrieve naming what to pass
    on the command line, and --tokenizer saves one with it."""
    # The two refusals run in their own process, where their stderr is all the user sees (one
    # line: no log line, warning or traceback beside it); the conversions that succeed, whose
    # report is printed on stdout, run in this one (main() returns: exit status 0).
    main(["convert", str(run / "final"), str(tmp_path / "s1.pth")])
    message = one_line(qformer("convert", str(tmp_path / "s1.pth"), str(tmp_path / "bad")), "convert")
    assert "pass --config JSON" in message and "missing" in message
    capsys.readouterr()
    main(["convert", str(tmp_path / "s1.pth"), str(tmp_path / "back"), "--config", str(run / "final" / "config.json")])
    out = capsys.readouterr().out
    assert out.count("dropped") == 1 and "--tokenizer" in out, out
    refused = one_line(qformer("retrieve", "--model", str(tmp_path / "back"), "--images", str(run.parent),
                               "--query", "x", "--device", "cpu"), "retrieve")
    assert "holds no tokenizer" in refused and "--tokenizer" in refused and "model.tokenizer" not in refused
    main(["convert", str(tmp_path / "s1.pth"), str(tmp_path / "full"), "--config", str(run / "final" / "config.json"),
          "--tokenizer", str(minilm_path)])
    out = capsys.readouterr()
    assert "note:" not in out.out, out.out + out.err
    assert (tmp_path / "full" / "tokenizer_config.json").is_file()


def test_stage1_server_answers_caption_as_the_caption_command(stage1):
    """Item 7: one behaviour: a stage-1 server's /caption is the Q-Former's caption, as qformer
    caption writes it, and caption --help says a stage-1 model is taken."""
    with running(create_app(ServedModel(stage1, "tiny-stage1"), Limits())) as url, httpx.Client(base_url=url,
                                                                                                  timeout=60) as client:
        got = client.post("/caption", files={"image": ("a.png", png_bytes(), "image/png")},
                          data={"max_new_tokens": "4"})
        assert "/caption" in client.get("/openapi.json").json()["paths"]
    assert got.status_code == 200, got.text
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    assert got.json()["caption"] == caption_texts(stage1, [image], max_new_tokens=4)[0]
    assert "stage-1 model" in qformer("caption", "--help").stdout


def test_eval_refuses_k_before_any_work(tmp_path, run, monkeypatch, capsys):
    """Item 8: --k too shallow for recall@10 is refused before the model loads, and the
    message's numbers agree (recall@10 over 4 texts needs k >= 4, said as such)."""
    root = tmp_path / "coco"
    entries = [{"image": f"val2014/{i}.png", "caption": [f"thing {i}", f"a thing {i}"]} for i in range(2)]
    (root / "val2014").mkdir(parents=True)
    for entry in entries:
        Image.open(io.BytesIO(png_bytes())).save(root / entry["image"])
    (root / "coco_karpathy_test.json").write_text(json.dumps(entries))

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded before --k was checked")

    monkeypatch.setattr("qformer.pretrained.auto.load_pretrained", loaded)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(run / "final"), "--task", "coco_retrieval", "--data", str(root), "--k", "1",
              "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.startswith("qformer eval: k = 1 is too shallow: recall@10 ranks the top 4 texts (of 4), so it "
                          "needs k >= 4"), err
    assert not (tmp_path / "out").exists()


def test_help_explains_serve_pixels_and_the_demo():
    """Item 10: serve's pixel limit says why it is below the other commands' 64,000,000, and
    demo --help has a description."""
    serve = " ".join(qformer("serve", "--help").stdout.split())
    assert "(default: 40000000)" in serve and "lower than the 64,000,000 of caption" in serve
    demo = qformer("demo", "--help").stdout
    assert "BLIP-2 in miniature" in demo


def test_eval_of_final_leaves_the_model_folder_as_exported(tmp_path, capsys):
    """Item 10: qformer eval RUN/final writes its results beside final/ (eval-final.json), not
    into it, and its log says where."""
    run = tmp_path / "run"
    main(["train", str(TINY), "--output_dir", str(run), "--steps", "1", "--save_every", "1"])
    before = sorted(path.name for path in (run / "final").iterdir())
    capsys.readouterr()
    main(["eval", str(run / "final")])
    assert sorted(path.name for path in (run / "final").iterdir()) == before
    assert (run / "eval-final.json").is_file()

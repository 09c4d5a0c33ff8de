"""``qformer eval``: a run's checkpoint on its held-out data (:mod:`qformer.train.evaluation`),
or a model on a paper's benchmark (``--model``, :mod:`qformer.evaluate.runner`). Only argparse
and the standard library at import."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qformer.cli.options import print_result, require_tokenizer


def generation_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--generate KEY=VALUE`` options, each a field of transformers' ``GenerationConfig``,
    checked before the model loads."""
    from transformers import GenerationConfig

    from qformer.train.config import parse_override_value

    known = set(GenerationConfig().to_dict())
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"--generate {pair!r}: write KEY=VALUE, e.g. --generate length_penalty=0")
        if key not in known:
            raise ValueError(f"--generate {key}: not an option of transformers' generate (GenerationConfig)")
        if key in ("num_beams", "max_new_tokens"):
            raise ValueError(f"--generate {key}: use --{key.replace('_', '-')}")
        options[key] = parse_override_value(value)
    return options


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from qformer.train.config import load_train_config
    from qformer.train.evaluation import evaluate_checkpoint, evaluate_run

    if (args.model is None) == (args.target is None):
        raise ValueError("pass a run folder or recipe (RUN_OR_RECIPE), or --model with --task and --data; not both")
    if args.model is not None:
        return _eval_benchmark(args, overrides)
    for flag in ("task", "data", "split", "prompt", "num_beams", "max_new_tokens", "generate", "limit", "features",
                 "chunk_size"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} goes with --model (a benchmark), not with a run")
    if args.checkpoint is not None:
        config = load_train_config(args.target, overrides)
        result = evaluate_checkpoint(config, args.checkpoint, args.out or results_file(Path(args.checkpoint)))
    elif Path(args.target).is_file():
        raise ValueError(f"{args.target} is a recipe: name the checkpoint with --checkpoint, or give a run folder")
    else:
        result = evaluate_run(args.target, overrides, args.out or results_file(Path(args.target)))
    print_result(result)
    return 0


def results_file(checkpoint: Path) -> Path | None:
    """Where the evaluation of the folder named (``checkpoint``) goes by default. A model folder
    (a run's final/, or any folder with a config.json) stays as it was exported, so that what is
    served, copied or uploaded from it is the model alone: its results go beside it, as
    ``eval-final.json`` in the run folder. A step_XXXXXXX/ checkpoint, or a run folder (its latest
    step), keeps the evaluation's own default, eval.json in the step (None)."""
    if (checkpoint / "config.json").is_file():
        return checkpoint.parent / f"eval-{checkpoint.name}.json"
    return None


def _eval_benchmark(args: argparse.Namespace, overrides: list[str]) -> int:
    """``qformer eval --model M --task T --data ROOT``: a paper's benchmark on a model."""
    from qformer.devices import default_device, parse_dtype
    from qformer.evaluate.registry import TASKS, check_task
    from qformer.evaluate.runner import evaluate_benchmark, summary_line
    from qformer.loading import model_fingerprint
    from qformer.pretrained.auto import find_model, load_pretrained
    from qformer.train.distributed import setup_runtime, teardown_runtime

    if overrides:
        raise ValueError(f"unrecognized arguments: {' '.join(overrides)} (section.key overrides go with a run)")
    if args.task is None or args.data is None:
        raise ValueError("--model needs --task and --data")
    if args.checkpoint is not None:
        raise ValueError("--checkpoint goes with a recipe, not with --model")
    from qformer.evaluate.benchmarks import BENCHMARKS
    from qformer.evaluate.ranking_tasks import RANKING_TASKS, check_files, check_prompt
    from qformer.evaluate.retrieval_tasks import RETRIEVAL_TASKS

    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: one of {', '.join(TASKS)}")
    retrieval = args.task in RETRIEVAL_TASKS
    goes_with = {"a retrieval task": RETRIEVAL_TASKS, "a question-answering task": [*BENCHMARKS, *RANKING_TASKS],
                 "a generating task": BENCHMARKS}
    for flag, kind in (("split", "a question-answering task"), ("prompt", "a question-answering task"),
                       ("num_beams", "a generating task"), ("max_new_tokens", "a generating task"),
                       ("generate", "a generating task"),
                       ("features", "a retrieval task"), ("chunk_size", "a retrieval task")):
        if getattr(args, flag) is not None and args.task not in goes_with[kind]:
            raise ValueError(f"--{flag.replace('_', '-')} goes with {kind}, not {args.task}")
    generation = generation_options(args.generate)  # before the model loads
    dtype = parse_dtype(args.dtype)
    if retrieval:  # --k against the test split's size, before the model loads and features are computed
        from qformer.evaluate.retrieval_tasks import check_retrieval_test

        check_retrieval_test(args.task, args.data, args.k, args.limit)
    else:
        benchmark, split = check_task(args.task, args.split)
        if args.task in RANKING_TASKS:
            check_prompt(benchmark, args.prompt)
            check_files(benchmark, Path(args.data), split)
    found = find_model(args.model)  # a directory holding no model fails here, as for every command
    if retrieval and found.kind != "stage1":
        raise ValueError(f"{args.model} holds {found.described}, not stage 1: --task {args.task} ranks with a "
                         "stage-1 model")
    if not retrieval and found.kind == "stage1":
        raise ValueError(f"{args.model} holds {found.described}: --task {args.task} needs a stage-2 model (BLIP-2, "
                         "InstructBLIP)")
    require_tokenizer(found, "eval")
    runtime = setup_runtime(args.device or default_device())  # under torchrun: one process per device
    fingerprint, out = model_fingerprint(found.directory), Path(args.out or f"eval-{args.task}")
    model = load_pretrained(found, dtype=dtype, device=runtime.device)
    if retrieval:
        from qformer.evaluate.retrieval_tasks import FEATURE_CHUNK, evaluate_retrieval_task

        results = evaluate_retrieval_task(model, args.task, args.data, out, k=args.k, batch_size=args.batch_size,
                                          limit=args.limit, fingerprint=fingerprint, features=args.features,
                                          chunk_size=FEATURE_CHUNK if args.chunk_size is None else args.chunk_size)
    else:
        results = evaluate_benchmark(model, args.task, args.data, out, split=args.split, prompt=args.prompt,
                                     batch_size=args.batch_size, limit=args.limit, fingerprint=fingerprint,
                                     **generation, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    teardown_runtime(runtime)
    if runtime.is_main:
        print(summary_line(results, out))
    return 0



def add_eval_command(commands: Any) -> None:
    """Register ``eval`` on an argparse subparsers object."""
    evaluate = commands.add_parser(
        "eval", help="evaluate a run's checkpoint on its held-out data, or a model on a paper's benchmark",
        description="Evaluate a run folder (its latest checkpoint), one of its step_XXXXXXX/ checkpoints or its "
                    "final/ model with the run's config.yaml (--section.key value overrides it), or a "
                    "checkpoint with a recipe (RECIPE --checkpoint X).")
    evaluate.add_argument("target", metavar="RUN_OR_RECIPE", nargs="?", default=None,
                          help="a run folder, a step_XXXXXXX/ or final/ folder of a run, or a YAML recipe "
                               "(with --checkpoint); or none, with --model")
    evaluate.add_argument("--checkpoint", default=None,
                          help="with a recipe: the step_XXXXXXX/ or final/ folder to evaluate (default: none, "
                               "the target is a run folder)")
    evaluate.add_argument("--out", default=None,
                          help="where to write the results: a run's JSON (default: eval.json in a "
                               "step_XXXXXXX/ folder; for a model folder such as final/, eval-final.json beside it, "
                               "the model folder left as exported), or with --model a folder (default: eval-TASK)")
    paper = evaluate.add_argument_group("a paper's benchmark on a model (see the table in docs/evaluation.md)")
    paper.add_argument("--model", default=None, help="a BLIP-2 or InstructBLIP directory or hub id")
    paper.add_argument("--task", default=None,
                       help="vqav2, okvqa, gqa, coco_caption, nocaps, flickr_caption (a stage-2 model, answers "
                            "generated); scienceqa, iconqa, vsr, hateful_memes (a stage-2 model, candidates ranked by "
                            "log-likelihood, as InstructBLIP); coco_retrieval, flickr_retrieval (a stage-1 model)")
    paper.add_argument("--data", default=None, help="the benchmark's folder, in its official layout")
    paper.add_argument("--split", default=None,
                       help="vqav2: val2014 or test-dev2015 (predictions only); scienceqa, iconqa: test or val; vsr: "
                            "test or dev; hateful_memes: dev_seen or test_seen; the other tasks have one (default: "
                            "the first)")
    paper.add_argument("--prompt", default=None,
                       help='the question\'s template (default: BLIP-2\'s, "Question: {} Answer:" for a decoder-only '
                            'LLM, "Question: {} Short answer:" for FlanT5), the caption\'s prompt (default: "a photo '
                            'of"), or a ranking task\'s template with named fields: {question} {options} {context} '
                            '(scienceqa), {question} {options} (iconqa), {caption} (vsr), {text} (hateful_memes)')
    paper.add_argument("--num-beams", type=int, default=None, help="beam width (default: 5, as BLIP-2)")
    paper.add_argument("--max-new-tokens", type=int, default=None,
                       help="longest answer (default: 10 for questions, 30 for captions, as BLIP-2)")
    paper.add_argument("--generate", action="append", default=None, metavar="KEY=VALUE",
                       help="any other option of transformers' generate for a generating task, the value read as "
                            "YAML (e.g. --generate length_penalty=0 --generate min_new_tokens=2); repeatable")
    paper.add_argument("--batch-size", type=int, default=16, help="questions or images per batch (default: 16)")
    paper.add_argument("--k", type=int, default=128,
                       help="retrieval: the ITC candidates re-ranked by ITM each way (default: 128, as BLIP-2)")
    paper.add_argument("--features", default=None, metavar="DIR",
                       help="retrieval: where the image and text features are kept, computed where missing; an "
                            "earlier evaluation's (its OUT or OUT/features) is reused, refused if the model or the "
                            "data differ (default: OUT/features)")
    paper.add_argument("--chunk-size", type=int, default=None,
                       help="retrieval: images or captions per feature file, what a resume recomputes at most "
                            "(default: 256)")
    paper.add_argument("--limit", type=int, default=None,
                       help="only the first N questions (retrieval: images, with their captions) (default: all)")
    paper.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: a GPU if there is one)")
    paper.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto: the checkpoint's "
                                                        "(default: auto)")
    evaluate.set_defaults(run=_eval, takes_overrides=True)

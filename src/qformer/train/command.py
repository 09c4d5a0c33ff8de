"""``qformer train`` and ``qformer eval``: the argument parsers and what they run. Only argparse
and the standard library at import: the training code is imported when a command runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _is_main_process() -> bool:
    """Rank 0 of torchrun's processes (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def _print_result(result: dict[str, Any]) -> None:
    if _is_main_process():
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


def _train_config(source: str, overrides: list[str], resume: bool):
    """A recipe plus overrides, or with ``--resume`` a run folder's ``config.yaml`` plus overrides
    (the run stays in that folder wherever it has moved)."""
    from qformer.train.config import load_train_config

    path = Path(source)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{source} is neither a recipe (YAML) nor a run folder")
        return load_train_config(path, overrides)
    if not resume:
        raise ValueError(f"{source} is a folder: give a recipe (YAML), or add --resume to continue the run in it")
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{source} has no config.yaml: there is no run there to resume")
    return load_train_config(path / "config.yaml", [*overrides, "--output_dir", str(path)])


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from qformer.train.loop import train
    from qformer.train.signals import TrainingStopped

    config = _train_config(args.recipe, overrides, args.resume)
    try:
        result = train(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingStopped as stopped:
        if _is_main_process():
            print(f"qformer train: {stopped}", file=sys.stderr)
        return stopped.status
    _print_result(result)
    return 0


def generation_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--generate KEY=VALUE`` options, each a field of transformers' ``GenerationConfig``,
    checked before the model loads."""
    from transformers import GenerationConfig

    from qformer.train.config import _parse_value

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
        options[key] = _parse_value(value)
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
        result = evaluate_checkpoint(load_train_config(args.target, overrides), args.checkpoint, args.out)
    elif Path(args.target).is_file():
        raise ValueError(f"{args.target} is a recipe: name the checkpoint with --checkpoint, or give a run folder")
    else:
        result = evaluate_run(args.target, overrides, args.out)
    _print_result(result)
    return 0


def _eval_benchmark(args: argparse.Namespace, overrides: list[str]) -> int:
    """``qformer eval --model M --task T --data ROOT``: a paper's benchmark on a model."""
    from qformer.devices import default_device, parse_dtype
    from qformer.evaluate.registry import TASKS, check_task
    from qformer.evaluate.runner import evaluate_benchmark, summary_line
    from qformer.loading import model_fingerprint, resolve_checkpoint
    from qformer.pretrained.stage2 import Blip2
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
    if not retrieval:
        benchmark, split = check_task(args.task, args.split)
        if args.task in RANKING_TASKS:
            check_prompt(benchmark, args.prompt)
            check_files(benchmark, Path(args.data), split)
    dtype = parse_dtype(args.dtype)
    runtime = setup_runtime(args.device or default_device())  # under torchrun: one process per device
    device = runtime.device
    directory = resolve_checkpoint(args.model)
    fingerprint, out = model_fingerprint(Path(directory)), Path(args.out or f"eval-{args.task}")
    if retrieval:
        from qformer.evaluate.retrieval_tasks import FEATURE_CHUNK, evaluate_retrieval_task
        from qformer.pretrained.stage1 import Blip2Stage1

        model = Blip2Stage1.from_pretrained(directory, dtype=dtype, device=device)
        results = evaluate_retrieval_task(model, args.task, args.data, out, k=args.k, batch_size=args.batch_size,
                                          limit=args.limit, fingerprint=fingerprint, features=args.features,
                                          chunk_size=FEATURE_CHUNK if args.chunk_size is None else args.chunk_size)
    else:
        model = Blip2.from_pretrained(directory, dtype=dtype, device=device)
        results = evaluate_benchmark(model, args.task, args.data, out, split=args.split, prompt=args.prompt,
                                     batch_size=args.batch_size, limit=args.limit, fingerprint=fingerprint,
                                     **generation, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    teardown_runtime(runtime)
    if runtime.is_main:
        print(summary_line(results, out))
    return 0


RECIPES_EPILOG = """\
recipes (configs/ in the repository; copy one and edit it for your data):
  stage1.yaml              BLIP-2 stage 1 (ITC + ITM + ITG): EVA ViT-g frozen, Q-Former from BERT
  stage2_opt.yaml          stage 2 with a decoder-only LLM (OPT) from a stage-1 final/
  stage2_t5.yaml           stage 2 with an encoder-decoder LLM (FlanT5), prefix-LM on captions
  caption_finetune.yaml    a released BLIP-2 fine-tuned for COCO captions at 364 px
  retrieval_finetune.yaml  stage 1 fine-tuned for image-text retrieval, recall@1/5/10
  vqa_finetune.yaml        a released BLIP-2 fine-tuned on VQAv2, VQA accuracy
  instruct.yaml            InstructBLIP instruction tuning on {"image", "instruction", "answer"} lines
  tiny.yaml                a debug-size stage 1 on built-in scenes: seconds on a CPU

overrides: any recipe value, as --section.key value or --section.key=value, read as YAML:
  qformer train configs/stage1.yaml --data.path captions.json --optim.lr 1e-4 --data.batch_size=32
  qformer train configs/stage1.yaml --optim.betas "[0.9, 0.999]" --model.bert /models/bert-base-uncased
every run ends in OUTPUT_DIR/final/, a model that loads in one call (see qformer export).
"""


def add_train_commands(commands: Any) -> None:
    """Register ``train`` and ``eval`` on an argparse subparsers object."""
    train = commands.add_parser(
        "train", help="train from a YAML recipe; --section.key value overrides it",
        description="Train from a YAML recipe (--section.key value overrides any of its values), or continue "
                    "a run with --resume. SIGINT (Ctrl-C), SIGTERM and SIGUSR1 save a checkpoint at the end of "
                    "the step and stop (exit status 128 + the signal), naming the command that resumes.",
        epilog=RECIPES_EPILOG)
    train.add_argument("recipe", metavar="RECIPE_OR_RUN",
                       help="a YAML recipe, e.g. configs/stage1.yaml; with --resume also a run folder")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the recipe's output_dir (or the run folder given) from its last "
                           "intact checkpoint, with its config.yaml; only steps, log_every, save_every, eval_every, "
                           "keep_last, tensorboard, device, parallel, activation_checkpointing, "
                           "data.num_workers (not with shards), data.eval_batch_size and optim.max_bad_steps "
                           "may change; after a torchrun restart (--max-restarts) the run resumes by itself "
                           "(default: off, a new run)")
    mode.add_argument("--overwrite", action="store_true",
                      help="clear an earlier run's checkpoints, metrics, plots and config.yaml from output_dir "
                           "first (default: off; a folder holding a run is refused)")
    train.set_defaults(run=_train, takes_overrides=True)
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
                          help="where to write the results: a run's JSON (default: eval.json in the evaluated "
                               "folder), or with --model a folder (default: eval-TASK)")
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

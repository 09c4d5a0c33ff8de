"""``qformer export MODEL OUT --format onnx|torch-export``: the image path written as portable
graphs, with everything a deployment reads beside them.

The folder holds the graphs (:mod:`qformer.export.graphs`: ``image_prefix`` for stage 2,
``image_features`` and ``text_features`` for stage 1), ``export.json`` (format, opset, dtype,
every input's and output's name, shape and dtype, the image preprocessing, the checkpoint's
fingerprint), the tokenizer(s) and ``preprocessor_config.json``. It is written whole or not at
all (:func:`~qformer.checkpoint.write_directory`): a failed trace leaves no folder that looks
complete."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qformer.checkpoint import write_directory
from qformer.convert.transformers_blip2 import preprocessor_dict
from qformer.devices import dtype_name
from qformer.export.graphs import BATCH, TEXT, Graph, graphs_for
from qformer.loading import model_fingerprint
from qformer.models.blip2 import Blip2Stage2Model
from qformer.models.instructblip import InstructBlipStage2Model
from qformer.onnx import MANIFEST
from qformer.pretrained.auto import find_model, load_pretrained
from qformer.pretrained.transformers import PREPROCESSOR_NAME
from qformer.tokenizer import save_tokenizer

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torch-export")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
OPSET = 18  # onnxruntime 1.16 and later run it; the exporter's own translations target it
# what each format's runtime runs: onnxruntime has few bfloat16 kernels on its CPU and CUDA providers
DTYPES = {"onnx": ("float32", "float16"), "torch-export": ("float32", "float16", "bfloat16")}


def check_request(format: str, dtype: str) -> str:
    """The dtype's canonical name, or a one-line refusal of a format and dtype that no runtime
    of that format runs."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    name = dtype_name(dtype)
    if name not in DTYPES[format]:
        raise ValueError(f"--dtype {name} cannot be exported as {format}: onnxruntime lacks {name} kernels for the "
                         f"image path's operators; use {' or '.join(DTYPES[format])}")
    return name


def export_directory(model: str | Path, out: str | Path, format: str = "onnx", dtype: str = "float32",
                     overwrite: bool = False) -> Path:
    """A model directory (or hub id) -> ``out``, the folder described above. ``dtype`` as the
    model loads (``float16``: the image encoder and projection in fp16, the Q-Former kept in fp32
    as transformers keeps it); the graphs take float32 pixels and cast them."""
    dtype = check_request(format, dtype)
    check_out(out, overwrite)
    found = find_model(model)
    loaded = load_pretrained(found, dtype=dtype)
    source = {"model": found.name, "kind": found.kind, "fingerprint": model_fingerprint(found.directory)}
    return export_model(loaded, out, format, dtype, source)


def check_out(out: str | Path, overwrite: bool) -> None:
    """``out`` may be written: new, empty, or ``overwrite`` given."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise ValueError(f"{out} exists and is not empty: choose another directory or pass --overwrite")


def export_model(model: nn.Module, out: str | Path, format: str = "onnx", dtype: str = "float32",
                 source: dict[str, Any] | None = None) -> Path:
    """A loaded model (stage 1, BLIP-2 or InstructBLIP, any image encoder) exported to ``out``.
    ``source`` is recorded in ``export.json`` (``qformer export`` gives the directory's name,
    kind and fingerprint)."""
    check_request(format, dtype)
    if getattr(model, "vision", None) is None:
        raise ValueError(f"this {type(model).__name__} has no image encoder (config.vision is None): the exported "
                         "image path starts from pixels")
    model.eval()
    graphs = graphs_for(model)

    def write(folder: Path) -> None:
        started = time.perf_counter()
        entries = {graph.name: export_graph(model, graph, folder, format) for graph in graphs}
        save_tokenizer(getattr(model, "tokenizer", None), folder)
        if isinstance(model, InstructBlipStage2Model):
            save_tokenizer(model.qformer_tokenizer, folder / "qformer_tokenizer")
        (folder / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_dict(model.config.image), indent=2) + "\n")
        manifest = describe(model, format, dtype, source, entries, time.perf_counter() - started)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: the folder is complete

    return write_directory(out, write)


def export_graph(model: nn.Module, graph: Graph, folder: Path, format: str) -> dict[str, Any]:
    """One graph traced with a dynamic batch (and text length) and written to ``folder``; its
    entry in ``export.json``. A model torch.export cannot trace fails in one line."""
    dims = {BATCH: torch.export.Dim(BATCH, min=1),
            TEXT: torch.export.Dim(TEXT, min=1, max=model.config.qformer.max_position_embeddings)}
    shapes = {name: {axis: dims[axis_name] for axis, axis_name in axes.items()} for name, axes in graph.dynamic.items()}
    args = tuple(graph.inputs.values())
    graph.module.eval()  # a wrapper starts in training mode; the model is in eval already
    path = folder / f"{graph.name}{SUFFIX[format]}"
    started = time.perf_counter()
    with torch.no_grad(), quiet_exporters():
        try:
            if format == "onnx":
                program = torch.onnx.export(graph.module, args, dynamo=True, input_names=list(graph.inputs),
                                            output_names=list(graph.outputs), dynamic_shapes=shapes,
                                            opset_version=OPSET, verbose=False)
                program.save(path, external_data=None)  # weights apart when the graph passes 2 GB
            else:
                torch.export.save(torch.export.export(graph.module, args, dynamic_shapes=shapes), path)
        except Exception as err:  # torch.export's errors run to pages: their first line says what failed
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot trace {type(model).__name__}'s {graph.name} with torch.export: {first}") from err
        outputs = graph.module(*args)
    seconds = time.perf_counter() - started
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    files = sorted(f.name for f in folder.iterdir() if f.name.startswith(path.name))
    return {
        "file": path.name,
        "files": {name: (folder / name).stat().st_size for name in files},
        "inputs": [spec(name, tensor, graph.dynamic.get(name, {})) for name, tensor in graph.inputs.items()],
        "outputs": [spec(name, tensor, {0: BATCH}) for name, tensor in zip(graph.outputs, outputs)],
        "export_seconds": round(seconds, 2),
    }


# The exporters' own chatter: onnxscript's and onnx_ir's passes log each rewrite at INFO (thousands of
# lines for EVA ViT-g), torch.onnx warns that torchvision's operators are not registered (none is used);
# what goes wrong is still said, at WARNING and above.
EXPORTER_LOGGERS = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR}


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """The exporters' loggers at :data:`EXPORTER_LOGGERS`' levels while a graph is written, then as they were."""
    loggers = {name: logging.getLogger(name) for name in EXPORTER_LOGGERS}
    levels = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(EXPORTER_LOGGERS[name])
    try:
        with warnings.catch_warnings():  # torch.export's own use of a pytree API it deprecates
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


def spec(name: str, tensor: Tensor, axes: dict[int, str]) -> dict[str, Any]:
    """A tensor's name, shape (dynamic axes by name) and dtype, as ``export.json`` lists it."""
    shape = [axes.get(axis, size) for axis, size in enumerate(tensor.shape)]
    return {"name": name, "shape": shape, "dtype": str(tensor.dtype).removeprefix("torch.")}


def describe(model: nn.Module, format: str, dtype: str, source: dict[str, Any] | None, graphs: dict[str, Any],
             seconds: float) -> dict[str, Any]:
    """``export.json``: what the folder holds and how its graphs are fed."""
    image = model.config.image
    manifest: dict[str, Any] = {
        "format": format,
        "kind": "instructblip" if isinstance(model, InstructBlipStage2Model)
        else "blip2" if isinstance(model, Blip2Stage2Model) else "stage1",
        "dtype": dtype,
        "opset": OPSET if format == "onnx" else None,
        "torch": torch.__version__,
        "source": source or {"model": None, "fingerprint": None},
        "image": {"size": image.size, "mean": list(image.mean), "std": list(image.std), "resize": "bicubic",
                  "scale": "1/255, then (x - mean) / std per channel"},
        "num_query_tokens": model.num_query_tokens,
        "graphs": graphs,
        "export_seconds": round(seconds, 2),
    }
    if isinstance(model, Blip2Stage2Model):
        config = model.language_model.config
        manifest["language_model"] = {"model_type": config.model_type, "is_encoder_decoder": model.is_encoder_decoder,
                                      "hidden_size": model.language_projection.out_features}
    return manifest

"""The exported image path run with onnxruntime, from PIL images or files, without PyTorch.

``qformer export MODEL OUT --format onnx`` writes the graphs and ``export.json``; this module
reads that folder, preprocesses images exactly as :func:`qformer.data.transforms.eval_image`
does (:mod:`qformer.data.pixels`: the same decoding and float32 table, so the same pixels) and
runs the graphs. It imports numpy, Pillow and onnxruntime only, so that a deployment needs no
torch::

    from qformer.onnx import ExportedModel
    model = ExportedModel("out/")
    prefix = model.image_prefix(["cat.jpg"])             # stage 2: (B, Q, D_llm), the LLM's input prefix
    scores = itc_scores(model.image_features(images),    # stage 1: retrieval's first pass
                        model.text_features(ids, mask))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnxruntime as ort
from PIL import Image

from qformer.config import ImageConfig
from qformer.data.pixels import load_image, normalised_pixels

MANIFEST = "export.json"
IMAGE_PREFIX, IMAGE_FEATURES, TEXT_FEATURES = "image_prefix", "image_features", "text_features"
ImageInput = str | Path | BinaryIO | Image.Image


class ExportedModel:
    """The graphs of one ``qformer export --format onnx`` folder, each an onnxruntime session
    (``providers``: onnxruntime's, default the CPU), and the preprocessing ``export.json`` names."""

    def __init__(self, folder: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.folder = Path(folder)
        file = self.folder / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{self.folder} holds no {MANIFEST}: not a qformer export --format onnx folder")
        self.manifest: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
        if self.manifest.get("format") != "onnx":
            raise ValueError(f"{self.folder} holds a {self.manifest.get('format')!r} export, not onnx graphs")
        image = self.manifest["image"]
        self.image = ImageConfig(size=image["size"], mean=tuple(image["mean"]), std=tuple(image["std"]))
        self.sessions = {
            name: ort.InferenceSession(str(self.folder / graph["file"]), providers=list(providers))
            for name, graph in self.manifest["graphs"].items()
        }

    @property
    def kind(self) -> str:
        """``blip2``, ``instructblip`` or ``stage1``."""
        return self.manifest["kind"]

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Paths, open files or PIL images -> float32 pixels (B, 3, S, S), as ``eval_transform``."""
        if isinstance(images, (str, Path, Image.Image)) or not images:
            raise ValueError("images: a non-empty list of paths or PIL images")
        return np.stack([normalised_pixels(load_image(image), self.image) for image in images])

    def run(self, graph: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """One graph on arrays named as ``export.json`` names its inputs; its outputs by name."""
        if graph not in self.sessions:
            raise ValueError(f"this export holds {sorted(self.sessions)}, not {graph!r}")
        session = self.sessions[graph]
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))

    def image_prefix(self, images: Sequence[ImageInput], qformer_input_ids: np.ndarray | None = None,
                     qformer_attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Stage 2: the projected queries (B, Q, D_llm) that go in front of the prompt's input
        embeddings. InstructBLIP also takes the instruction as the Q-Former's tokenizer gives it
        (int64 ids and mask, (B, T))."""
        inputs = {"pixel_values": self.preprocess(images)}
        if self.kind == "instructblip":
            if qformer_input_ids is None:
                raise ValueError("InstructBLIP's image prefix reads the instruction: pass qformer_input_ids")
            if qformer_attention_mask is None:
                qformer_attention_mask = np.ones_like(qformer_input_ids)
            inputs.update(qformer_input_ids=np.asarray(qformer_input_ids, np.int64),
                          qformer_attention_mask=np.asarray(qformer_attention_mask, np.int64))
        return self.run(IMAGE_PREFIX, **inputs)["language_model_inputs"]

    def image_features(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Stage 1: L2-normalised ITC image features (B, Q, E), one per query."""
        return self.run(IMAGE_FEATURES, pixel_values=self.preprocess(images))["image_features"]

    def text_features(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Stage 1: L2-normalised ITC text features (B, E), from the tokenizer saved beside the
        graphs (right-padded ids and mask, (B, T))."""
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.run(TEXT_FEATURES, input_ids=np.asarray(input_ids, np.int64),
                        attention_mask=np.asarray(mask, np.int64))["text_features"]


def itc_scores(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Every image's ITC similarity with every text, the max over queries: (Ni, Q, E) x (Nt, E)
    -> (Ni, Nt), as :meth:`qformer.Blip2Stage1.itc_scores` computes it."""
    return np.einsum("iqe,te->itq", image_features, text_features).max(axis=-1)

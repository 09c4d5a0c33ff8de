"""LAVIS ``.pth`` files: read without running pickled code, written atomically, and the models
built from them (stage 1's ``Blip2Qformer``, stage 2's ``Blip2OPT``, ``Blip2T5``, InstructBLIP's).
The key layouts are :mod:`qformer.convert.blip2_layouts`' and :mod:`qformer.convert.lavis_pth`'s."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from qformer.checkpoint import atomic_write, load_plain, load_state_dict_strict
from qformer.config import Blip2Config, Blip2Stage1Config
from qformer.convert.blip2_layouts import LAVIS_STAGE1_SOURCE, fill_fresh_stage1, stage1_state_from_lavis
from qformer.convert.lavis_pth import LavisStage2Layout, stage2_state_from_lavis
from qformer.convert.rename import ConversionReport
from qformer.loading import tied_parameters
from qformer.models.blip2 import Blip2Stage1Model, Blip2Stage2Model

M = TypeVar("M", bound=Blip2Stage1Model)  # the class a builder builds: the architecture or what users load


def read_lavis_pth(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a LAVIS checkpoint: its ``"model"`` entry (the other entries, such as
    ``optimizer`` or ``epoch``, are ignored), or the whole file when it is a bare state dict.
    Loaded with ``weights_only=True``: a pickle that would run code is refused."""
    path = Path(path)
    check_torch_file(path)
    content = load_plain(path)
    state = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a LAVIS checkpoint, a dict whose 'model' entry maps names to tensors")
    return state


def check_torch_file(path: Path) -> None:
    """Refuse, in one line, a file that ``torch.save`` did not write, before torch reads it: torch's
    reader would fail on a text or an image file with a bare KeyError (the byte it did not expect,
    e.g. ``101``). ``torch.save`` writes a zip archive (``PK``), or before torch 1.6 a pickle
    (protocol 2 and above start with ``0x80``). Nothing is unpickled here."""
    with path.open("rb") as file:
        head = file.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ValueError(f"{path} is not a torch checkpoint (neither the zip archive nor the pickle that torch.save "
                         "writes): expected a LAVIS .pth file, or a model directory")


def _compact(tensor: Tensor) -> Tensor:
    """A view (e.g. one third of a fused qkv bias) copied out, so that torch.save stores only it."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def save_lavis_pth(state_dict: Mapping[str, Tensor], path: str | Path) -> None:
    """``{"model": state_dict}`` with ``torch.save``, as LAVIS writes and reads it: a pickle, of
    plain tensors only. Tied tensors stay shared."""
    content = {"model": {key: _compact(tensor) for key, tensor in state_dict.items()}}
    atomic_write(path, lambda tmp: torch.save(content, tmp))


def fill_tied(module: nn.Module, state_dict: dict[str, Tensor], report: ConversionReport) -> None:
    """A checkpoint stores one tensor of each tied group: give the others the same one."""
    for group in tied_parameters(module):
        present = [k for k in group if k in state_dict]
        if not present:
            continue
        for key in group:
            if key not in state_dict:
                state_dict[key] = state_dict[present[0]]
                report.dropped[key] = f"tied to {present[0]}: not stored"


def stage1_from_lavis(
    state_dict: Mapping[str, Tensor], config: Blip2Stage1Config, model_cls: type[M] = Blip2Stage1Model
) -> tuple[M, ConversionReport]:
    """A stage-1 model (``model_cls``) from a LAVIS ``Blip2Qformer`` state dict (the ``model`` entry of its
    ``.pth``). Without an image encoder in ``config``, ``visual_encoder.*`` is dropped."""
    ours, report = stage1_state_from_lavis(state_dict, config)
    model = model_cls(config)
    fill_fresh_stage1(ours, report, model.state_dict(), LAVIS_STAGE1_SOURCE, config.temperature)
    load_state_dict_strict(model, ours)
    return model, report


def stage2_from_lavis(
    state_dict: Mapping[str, Tensor],
    config: Blip2Config,
    layout: LavisStage2Layout,
    model_cls: type[Blip2Stage2Model] = Blip2Stage2Model,
    **model_kwargs,
) -> tuple[Blip2Stage2Model, ConversionReport]:
    """``model_cls(config, **model_kwargs)`` holding a LAVIS stage-2 state dict (the ``model``
    entry of its ``.pth``): every key must find its place, and every weight of the model must be
    there (LAVIS's released files leave the frozen LLM and image encoder out: add them first)."""
    ours, report = stage2_state_from_lavis(state_dict, config, layout)
    model = model_cls(config, **model_kwargs)
    fill_tied(model, ours, report)
    load_state_dict_strict(model, ours)
    return model, report

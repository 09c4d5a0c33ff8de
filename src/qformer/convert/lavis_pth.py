"""The key layouts of LAVIS's ``.pth`` checkpoints of stage-2 models (``Blip2OPT``, ``Blip2T5``,
InstructBLIP's): a state dict in, a state dict out. Reading and writing the files is
:mod:`qformer.pretrained.lavis`'s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from qformer.config import Blip2Config, QFormerConfig
from qformer.convert.blip2_layouts import LAVIS_VISION, fuse_lavis_qkv_bias, split_lavis_qkv_bias
from qformer.convert.qformer_layouts import BERT_ENCODER
from qformer.convert.rename import ConversionReport, RenameTable

VISION_PREFIX = "visual_encoder."
STAGE1_MARKER = "itm_head.weight"
"""Only LAVIS's stage-1 ``Blip2Qformer`` has an ITM head."""


_QFORMER_TEXT_PATH = "LAVIS's stage-2 Q-Former does not use its text path (LAVIS sets it to None)"


def _without_text_path(table: RenameTable) -> RenameTable:
    """``table`` with its text embeddings and text FFN rules turned into drops."""
    is_text = [ours.startswith(("embeddings.word.", "embeddings.position.")) or ".text_ffn." in ours
               for _, ours in table.rules]
    kept = tuple(rule for rule, text in zip(table.rules, is_text) if not text)
    dropped = tuple((theirs, _QFORMER_TEXT_PATH) for (theirs, _), text in zip(table.rules, is_text) if text)
    return RenameTable(kept, table.drop + dropped, table.drop_ours)


@dataclass(frozen=True)
class LavisStage2Layout:
    """One of LAVIS's stage-2 models: where it keeps the projection into the LLM and the LLM,
    which LLMs (transformers ``model_type``) it holds, whether its Q-Former keeps the text path,
    and the keys that tell its checkpoints apart."""

    name: str
    projection: str
    llm: str
    model_types: tuple[str, ...]
    markers: tuple[str, ...]
    qformer_text: bool = False

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        return all(key in state_dict for key in self.markers)

    def qformer_config(self, config: QFormerConfig) -> QFormerConfig:
        """The Q-Former this layout holds: without the text path unless it keeps it; never an LM head."""
        if self.qformer_text:
            return config.replace(use_text_input=True, use_lm_head=False)
        return config.replace(use_text_input=False, use_lm_head=False, bos_token_id=None)

    def table(self, vision: bool = True) -> RenameTable:
        """LAVIS keys <-> :class:`~qformer.models.blip2.Blip2Stage2Model` keys; without ``vision``,
        ``visual_encoder.*`` is dropped."""
        if vision:
            image = LAVIS_VISION.under(VISION_PREFIX, "vision.")
        else:
            image = RenameTable((), ((VISION_PREFIX, "config.vision is None: images come as features"),))
        qformer = BERT_ENCODER if self.qformer_text else _without_text_path(BERT_ENCODER)
        heads = RenameTable(
            rules=(
                ("ln_vision.", "ln_vision."),
                ("query_tokens", "query_tokens"),
                (f"{self.projection}.", "language_projection."),
                (f"{self.llm}.", "language_model."),
            ),
            drop=(("Qformer.cls.", "a stage-2 Q-Former has no LM head (LAVIS sets it to None)"),),
        )
        return image + heads + qformer.under("Qformer.bert.", "qformer.")


BLIP2_OPT = LavisStage2Layout("Blip2OPT", "opt_proj", "opt_model", ("opt",), ("opt_proj.weight",))
BLIP2_T5 = LavisStage2Layout("Blip2T5", "t5_proj", "t5_model", ("t5",), ("t5_proj.weight",))

# InstructBLIP keeps the Q-Former's text path (it reads the instruction). Blip2T5Instruct has the
# keys of Blip2T5 (whose files may hold the unused text path too): the config tells them apart.
BLIP2_T5_INSTRUCT = LavisStage2Layout(
    "Blip2T5Instruct", "t5_proj", "t5_model", ("t5",), ("t5_proj.weight",), qformer_text=True
)
BLIP2_VICUNA_INSTRUCT = LavisStage2Layout(
    "Blip2VicunaInstruct", "llm_proj", "llm_model", ("llama",), ("llm_proj.weight",), qformer_text=True
)

STAGE2_LAYOUTS: tuple[LavisStage2Layout, ...] = (BLIP2_OPT, BLIP2_T5, BLIP2_T5_INSTRUCT, BLIP2_VICUNA_INSTRUCT)
"""Tried in order: a layout whose markers are a superset of another's comes first."""


def lavis_layout(state_dict: Mapping[str, Tensor], instruct: bool = False) -> LavisStage2Layout | None:
    """The stage-2 layout of a LAVIS state dict; None for a stage-1 ``Blip2Qformer``. ``instruct``
    picks InstructBLIP where the keys alone cannot (T5)."""
    if STAGE1_MARKER in state_dict:
        return None
    matching = [layout for layout in STAGE2_LAYOUTS if layout.matches(state_dict)]
    for layout in matching:
        if layout.qformer_text == instruct or len(matching) == 1:
            return layout
    markers = [STAGE1_MARKER] + [" + ".join(layout.markers) for layout in STAGE2_LAYOUTS]
    raise ValueError(f"not a LAVIS BLIP-2 state dict I know: it has none of {', '.join(markers)}")


def layout_for_llm(model_type: str, instruct: bool = False) -> LavisStage2Layout:
    """The LAVIS BLIP-2 (or, with ``instruct``, InstructBLIP) layout that holds an LLM of this
    transformers ``model_type``."""
    for layout in STAGE2_LAYOUTS:
        if model_type in layout.model_types and layout.qformer_text == instruct:
            return layout
    known = sorted(t for layout in STAGE2_LAYOUTS for t in layout.model_types)
    raise ValueError(f"LAVIS has no BLIP-2 layout for a {model_type!r} LLM; it has one for {known}")


def stage2_state_from_lavis(
    state_dict: Mapping[str, Tensor], config: Blip2Config, layout: LavisStage2Layout
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A LAVIS stage-2 state dict (the ``model`` entry of its ``.pth``) under the names of a
    stage-2 model of ``config``, and the report: every key must find its place."""
    table = layout.table(vision=config.vision is not None)
    ours, report = table.to_ours(fuse_lavis_qkv_bias(state_dict))
    report.raise_if_unmatched(f"LAVIS {layout.name}")
    return ours, report


def stage2_to_lavis(
    state_dict: Mapping[str, Tensor], config: Blip2Config
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A stage-2 model's weights (its state dict and config) in the LAVIS layout of its LLM, frozen
    parts included."""
    layout = layout_for_llm(config.text_config["model_type"], config.qformer.use_text_input)
    theirs, report = layout.table(vision=config.vision is not None).to_theirs(state_dict)
    report.raise_if_unmatched("qformer BLIP-2")
    return split_lavis_qkv_bias(theirs), report

"""What the server runs on the model: its limits, the batch functions of each route, streaming.

Everything here runs on the model thread (see :mod:`qformer.serve.batching`); the HTTP side
(:mod:`qformer.serve.app`) decodes and checks the requests before they get here.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from qformer.checks import check_positions, llm_positions
from qformer.pretrained.stage1 import Blip2Stage1
from qformer.pretrained.stage2 import CAPTION_DEFAULTS, VQA_DEFAULTS, Blip2
from qformer.serve.completions import ChatSettings, Completion, complete
from qformer.serve.gallery import Gallery, Hit
from qformer.serve.limits import Limits

VQA_PROMPT = "Question: {} Answer:"  # BLIP-2's (Blip2.answer's default)
RERANK_K = 16  # ITC candidates re-ranked by ITM per search (LAVIS's protocol uses k = 16 on COCO)


@dataclass(frozen=True)
class Generation:
    """One /caption or /vqa request, decoded and checked."""

    image: Image.Image
    prompt: str  # the text the LLM continues (a question already in VQA_PROMPT)


@dataclass(frozen=True)
class Match:
    image: Image.Image
    texts: list[str]


@dataclass(frozen=True)
class Search:
    text: str | None
    image: Image.Image | None
    top: int


class ServedModel:
    """A loaded model and the routes it answers: ``caption`` and ``vqa`` for a stage-2 model
    (BLIP-2, InstructBLIP), ``caption`` (the Q-Former's), ``match`` and ``search`` for a stage-1 one."""

    def __init__(self, model: Blip2 | Blip2Stage1, name: str, gallery: Gallery | None = None) -> None:
        self.model, self.name, self.gallery = model, name, gallery
        self.kind = "stage1" if isinstance(model, Blip2Stage1) else "stage2"
        if self.kind == "stage2" and gallery is not None:
            raise ValueError("--gallery is searched by a stage-1 model; this is a stage-2 model (captions, questions)")
        # A stage-1 model captions too, with its Q-Former alone, as ``qformer caption`` does.
        self.routes = ("caption", "match", "search") if self.kind == "stage1" else ("caption", "vqa")
        # The request side's own tokenizer: a fast tokenizer is not safe to call from two threads
        # at once, and the model thread calls the model's.
        self._checking_tokenizer = copy.deepcopy(model.tokenizer) if self.kind == "stage2" else None

    def check_generation(self, prompt: str, max_new_tokens: int) -> None:
        """Refuse (ValueError naming the request's numbers) a prompt that, with the queries and
        ``max_new_tokens``, overflows the LLM's positions. Checked for each request alone before
        it joins a batch, where the same error would fail every request batched with it."""
        if self._checking_tokenizer is None:
            return
        tokens = len(self._checking_tokenizer(prompt).input_ids)
        check_positions(f"{self.model.num_query_tokens} queries + the prompt's {tokens} tokens + "
                        f"max_new_tokens {max_new_tokens}", self.model.num_query_tokens + tokens + max_new_tokens,
                        llm_positions(self.model.language_model), "this model's LLM (max_position_embeddings)",
                        "shorten the prompt or ask for fewer new tokens")

    def generation_settings(self, route: str, max_new_tokens: int | None, num_beams: int | None,
                            limits: Limits) -> dict[str, Any]:
        """BLIP-2's settings for ``route`` (5 beams; 30 new tokens for captions, 10 for answers),
        what the request asked instead, and the defaults within ``limits``."""
        settings = dict(CAPTION_DEFAULTS if route == "caption" else VQA_DEFAULTS)
        settings["max_new_tokens"] = max_new_tokens or min(settings["max_new_tokens"], limits.max_new_tokens)
        settings["min_new_tokens"] = min(settings["min_new_tokens"], settings["max_new_tokens"])
        settings["num_beams"] = num_beams or min(settings["num_beams"], limits.max_num_beams)
        return settings

    def run_batch(self, key: Hashable, payloads: Sequence[Any]) -> list[Any]:
        """The model's answers to one batch of requests sharing ``key`` (route, settings): one
        result, or one exception, per request (a search's failure is its own)."""
        route = key[0]
        start = time.perf_counter()
        if route == "caption" and self.kind == "stage1":
            from qformer.retrieval import caption_texts

            texts = caption_texts(self.model, [p.image for p in payloads], **dict(key[1]))
            seconds = time.perf_counter() - start
            return [{"caption": text, "seconds": seconds} for text in texts]
        if route in ("caption", "vqa"):
            texts = self.model.generate_text([p.image for p in payloads], [p.prompt for p in payloads], **dict(key[1]))
            seconds = time.perf_counter() - start
            return [{("caption" if route == "caption" else "answer"): text, "seconds": seconds} for text in texts]
        if route == "match":
            return self._match(payloads)
        if route == "search":
            return [_result_or_error(self._search, payload) for payload in payloads]
        if route == "chat":
            return complete(self.model, [p.image for p in payloads], [p.prompt for p in payloads], key[1])
        if route == "stream":  # one request per batch (its key is its own)
            return [self.stream(*payload) for payload in payloads]
        if route == "chat-stream":
            return [self.chat_stream(*payload) for payload in payloads]
        raise ValueError(f"no route {route!r}")

    def stream(self, payload: Generation, settings: dict[str, Any], emit: Callable[[str], None],
               abandoned: threading.Event) -> str:
        """One generation, greedy, calling ``emit(text so far)`` as tokens come; the final text.
        It stops at the next token once ``abandoned`` is set (the client went away)."""
        streamer = _TextStreamer(self.model.tokenizer, emit)
        return self.model.generate_text([payload.image], [payload.prompt], streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([Abandoned(abandoned)]), **settings)[0]

    def chat_stream(self, payload: Generation, settings: ChatSettings, emit: Callable[[str], None],
                    abandoned: threading.Event) -> list[Completion]:
        """One chat completion, as :meth:`stream` streams a caption: ``emit(text so far)`` as
        tokens come (stop strings included: the HTTP side holds them back)."""
        return complete(self.model, [payload.image], [payload.prompt], settings,
                        streamer=_TextStreamer(self.model.tokenizer, emit),
                        stopping_criteria=[Abandoned(abandoned)])[0]

    def render_chat(self, messages: list[dict[str, str]], template: str) -> str:
        """The conversation as the model's prompt, by ``template`` (Jinja, rendered by transformers'
        ``apply_chat_template`` with the tokenizer's special tokens at hand)."""
        return self._checking_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                            add_generation_prompt=True)

    def prompt_tokens(self, prompt: str) -> int:
        """What ``prompt`` puts in front of the new tokens: the queries and its tokens."""
        return self.model.num_query_tokens + len(self._checking_tokenizer(prompt).input_ids)

    def room_for_new_tokens(self, prompt: str, limits: Limits) -> int:
        """The most new tokens the LLM's positions leave after ``prompt``, within ``max_new_tokens``."""
        positions = llm_positions(self.model.language_model)
        if positions is None:
            return limits.max_new_tokens
        return max(1, min(limits.max_new_tokens, positions - self.prompt_tokens(prompt)))

    @torch.no_grad()
    def _match(self, payloads: Sequence[Match]) -> list[dict[str, Any]]:
        from qformer.models.blip2 import expand_key_values
        from qformer.pretrained.stage1 import extract_features, image_embeds_of, tokenize

        model = self.model
        embeds = image_embeds_of(model, [p.image for p in payloads])  # (B, S, W): each image once
        kv = model.qformer.encoder_key_values(embeds)
        image_feats = model.image_features(model.query_pass(kv).last_hidden_state)  # (B, Q, E)
        texts = [text for p in payloads for text in p.texts]
        rows = torch.tensor([i for i, p in enumerate(payloads) for _ in p.texts], device=embeds.device)
        input_ids, attention_mask = tokenize(model, texts)
        hidden = model.multimodal_pass(input_ids, attention_mask, expand_key_values(kv, rows)).last_hidden_state
        itm = model.itm_logits(hidden).softmax(-1)[:, 1]  # (N,) the probability of a match, as itm_scores
        text_feats = extract_features(model, input_ids=input_ids, attention_mask=attention_mask).text  # (N, E)
        itc = torch.einsum("nqe,ne->nq", image_feats[rows], text_feats).amax(-1)  # each pair's similarity
        out, start = [], 0
        for p in payloads:
            end = start + len(p.texts)
            out.append({"texts": p.texts, "itm": itm[start:end].float().tolist(),
                        "itc": itc[start:end].float().tolist()})
            start = end
        return out

    def _search(self, payload: Search) -> dict[str, Any]:
        if self.gallery is None:
            raise ValueError("this server has no gallery: start it with --gallery IMAGES_DIR")
        self.gallery.refresh_if_changed()
        if payload.text is not None:
            hits = self.gallery.search_text(payload.text, payload.top, max(RERANK_K, payload.top))
            return {"results": [_image_hit(hit) for hit in hits]}
        hits = self.gallery.search_image(payload.image, payload.top, max(RERANK_K, payload.top))
        return {"results": [{"text": hit.item, "score": hit.score, "itc": hit.itc} for hit in hits]}


class Abandoned(StoppingCriteria):
    """Every row is done once ``event`` is set: the client went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _result_or_error(fn: Callable[[Any], Any], payload: Any) -> Any:
    """``fn(payload)``, or the ValueError it raised: the request's own refusal, not its batch's."""
    try:
        return fn(payload)
    except ValueError as err:
        return err


def _image_hit(hit: Hit) -> dict[str, Any]:
    """An image result: its name in the gallery (never the server's path to it) and the URL it is
    served at, the name percent-encoded there (a file may be named ``a#1.png`` or ``50%.png``)."""
    return {"image": hit.item, "url": f"/gallery/{quote(hit.item, safe='')}", "score": hit.score, "itc": hit.itc}


class _TextStreamer:
    """transformers' streamer protocol (``put`` token ids, ``end``): the first ``put`` is the
    prompt (skipped); each later one adds a token, and the text so far is emitted when it changed."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.tokens: list[int] = []
        self.text = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens += value.flatten().tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        if text != self.text:
            self.text = text
            self.emit(text)

    def end(self) -> None:
        pass


"""Chat completions on the model thread: one generation for a batch of conversations already
turned into prompts, and for each row what OpenAI's API reports of it: the text (cut before a
stop string), its tokens, why it ended, and the tokens' log-probabilities.

Decoding is transformers' ``generate`` through :meth:`~qformer.pretrained.stage2.Blip2.generate_ids`,
so a completion's text is what ``Blip2.generate_text`` gives with the same settings. What
OpenAI's API adds and ``generate`` has no option for is here: stop strings matched on the
decoded text (:class:`RowEnds`, which also records where each row ended) and the additive
presence and frequency penalties (:class:`OpenAIPenalties`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from qformer.pretrained.stage2 import Blip2


@dataclass(frozen=True)
class ChatSettings:
    """How one request decodes (hashable: requests with equal settings share a batch).
    ``temperature`` 0 is greedy decoding; above 0, sampling with ``top_p`` (no top-k cut, as
    OpenAI's API has none)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0

    def generation(self) -> dict[str, Any]:
        """The keywords of ``generate`` these settings make (without the stopping and the processors)."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "num_beams": 1, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": 1, "do_sample": True, "top_k": 0,
                "temperature": self.temperature, "top_p": self.top_p, "num_return_sequences": self.n}


@dataclass(frozen=True)
class TokenLogprob:
    """A token as OpenAI's ``logprobs.content`` lists it: its text, its UTF-8 bytes and log-probability."""

    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class Completion:
    """One choice: the text, its tokens (the one that ended it included), ``stop`` or
    ``length``, and per token its log-probability with the ``top_logprobs`` most likely."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]]] | None = None


class RowEnds(StoppingCriteria):
    """Each row is done at a stop id, or once its decoded new text holds one of ``stops``; the
    number of tokens it had then is kept in ``lengths`` (None: it ran to the maximum length).
    ``generate`` pads a finished row from there on, so the lengths are where the rows end."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], stops: Sequence[str]) -> None:
        self.tokenizer, self.stop_ids, self.stops = tokenizer, torch.tensor(list(stop_ids)), tuple(stops)
        self.start: int | None = None  # input_ids' length at the first call: the tokens before the new ones
        self.lengths: list[int | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
            self.lengths = [None] * input_ids.shape[0]
        generated = input_ids.shape[1] - self.start
        done = torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))
        for row, length in enumerate(self.lengths):
            if length is not None:
                done[row] = True
            elif done[row] or (self.stops and self._holds_stop(input_ids[row, self.start:])):
                self.lengths[row] = generated
                done[row] = True
        return done

    def _holds_stop(self, new_tokens: torch.Tensor) -> bool:
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return any(stop in text for stop in self.stops)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: each token's logit less ``presence`` if the
    completion so far holds it and ``frequency`` times the number of times it does (the prompt
    not counted). transformers' ``repetition_penalty`` divides instead, and counts the prompt."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        counts = torch.zeros_like(scores)  # (rows, V): how often each token was generated so far
        counts.scatter_add_(1, input_ids[:, self.start:], torch.ones_like(input_ids[:, self.start:], dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


def complete(model: Blip2, images: Sequence[Any], prompts: Sequence[str], settings: ChatSettings,
             **generate_kwargs: Any) -> list[list[Completion]]:
    """``settings.n`` completions of each prompt after its image, in one generation; with a
    seed, torch's generator is seeded first (so the request decodes alone: see the batch key in
    :mod:`qformer.serve.openai_routes`). ``generate_kwargs`` (a streamer, stopping criteria) go to
    ``generate``."""
    tokenizer = model.tokenizer
    ends = RowEnds(tokenizer, model.stop_token_ids(), settings.stop)
    processors = LogitsProcessorList()
    if settings.presence_penalty or settings.frequency_penalty:
        processors.append(OpenAIPenalties(settings.presence_penalty, settings.frequency_penalty))
    stopping = StoppingCriteriaList([ends, *generate_kwargs.pop("stopping_criteria", [])])
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    out = model.generate_ids(images, prompts, **settings.generation(), stopping_criteria=stopping,
                             logits_processor=processors, return_dict_in_generate=True,
                             output_logits=settings.logprobs, **generate_kwargs)
    sampled_rows = settings.n if settings.temperature > 0 else 1  # greedy: one row, the same answer n times
    choices = []
    for image in range(len(prompts)):
        rows = [_completion(tokenizer, out, image * sampled_rows + k, ends, settings) for k in range(sampled_rows)]
        choices.append(rows * (settings.n // sampled_rows))
    return choices


def _completion(tokenizer: Any, out: Any, row: int, ends: RowEnds, settings: ChatSettings) -> Completion:
    length = ends.lengths[row] if ends.lengths and ends.lengths[row] is not None else out.sequences.shape[1]
    ids = out.sequences[row, :length].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((text.find(stop) for stop in settings.stop if stop in text), default=-1)
    text = (text[:cut] if cut >= 0 else text).strip()
    reason = "length" if ends.lengths[row] is None else "stop"
    logprobs = None
    if settings.logprobs:
        logprobs = []
        for step, token in enumerate(ids):
            log_softmax = out.logits[step][row].float().log_softmax(-1)  # (V,): the model's own distribution
            top = log_softmax.topk(settings.top_logprobs) if settings.top_logprobs else None
            alternatives = [] if top is None else [_token(tokenizer, i, v) for v, i in zip(top.values.tolist(),
                                                                                        top.indices.tolist())]
            logprobs.append((_token(tokenizer, token, float(log_softmax[token])), alternatives))
    return Completion(text, ids, reason, logprobs)


def _token(tokenizer: Any, token_id: int, logprob: float) -> TokenLogprob:
    text = tokenizer.decode([token_id])
    return TokenLogprob(text, logprob, list(text.encode("utf-8", errors="replace")))

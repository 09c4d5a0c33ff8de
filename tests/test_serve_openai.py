"""``qformer serve``'s OpenAI routes, called by the official ``openai`` client against real
``qformer serve`` processes on loopback: BLIP-2 OPT (with an API key, local media and URL
fetching), BLIP-2 T5 and InstructBLIP (LLaMA, with a chat template of the operator's). Each
answer is compared with the model loaded here: the text equals ``Blip2.generate_text`` with
the same settings, the usage counts the queries, the prompt's and the generated tokens."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from qformer.pretrained.stage2 import Blip2
from qformer.serve.completions import OpenAIPenalties
from serve_helpers import metric, png_bytes, serve_processes
from stage2_helpers import QUERIES, save_tiny_blip2, tiny_tokenizer
from test_instructblip import tiny_transformers_instructblip

KEY = "test-key-1234"
QUESTION = "what colour is the ball"
TEMPLATE = ("{%- for message in messages -%}{%- if message['role'] == 'system' -%}{{ message['content'] + ' ' }}"
            "{%- elif message['role'] == 'user' -%}{{ message['content'] }}{%- endif -%}{%- endfor -%}")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def asking(question: str, url: str, system: str | None = None) -> list[dict]:
    """One user message with a question and an image (a system message first, if given)."""
    first = [{"role": "system", "content": system}] if system else []
    return first + [{"role": "user", "content": [{"type": "text", "text": question},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]


class Served:
    """A running server, its client, the same model loaded here, and how it writes the prompt."""

    def __init__(self, url: str, model: Blip2, name: str, key: str, prompt_of) -> None:
        self.url, self.model, self.name, self.prompt_of = url, model, name, prompt_of
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)

    def ask(self, image: bytes, question: str = QUESTION, **options):
        return self.client.chat.completions.create(model=self.name, messages=asking(question, data_url(image)),
                                                   **options)

    def reference(self, image: bytes, question: str = QUESTION, system: str | None = None, **generation):
        """The same model's answer here: (text, new token ids of each row), greedy unless told."""
        prompt = self.prompt_of(question, system)
        picture = [Image.open(io.BytesIO(image))]
        settings = {"num_beams": 1, "do_sample": False, **generation}
        out = self.model.generate_ids(picture, [prompt], **settings)
        ids = out if isinstance(out, torch.Tensor) else out.sequences
        return [t.strip() for t in self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)], out, prompt

    def generated(self, row: torch.Tensor) -> int:
        """Tokens a row generated: up to its first stop id, that one included."""
        stops = self.model.stop_token_ids()
        for i, token in enumerate(row.tolist()):
            if token in stops:
                return i + 1
        return len(row)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "photos").mkdir()
    (folder / "photos" / "a.png").write_bytes(png_bytes(5))
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory, media):
    root = tmp_path_factory.mktemp("openai-models")
    save_tiny_blip2(root / "opt", "opt")
    save_tiny_blip2(root / "t5", "t5")
    tiny_transformers_instructblip("llama").save_pretrained(root / "instructblip")
    tiny_tokenizer(add_bos=True).save_pretrained(root / "instructblip")
    tiny_tokenizer(add_bos=False).save_pretrained(root / "instructblip" / "qformer_tokenizer")
    (root / "template.jinja").write_text(TEMPLATE)
    common = ["--device", "cpu", "--max-new-tokens", "12"]
    arguments = [
        ["--model", str(root / "opt"), "--served-model-name", "blip2-opt", "--allowed-local-media", str(media),
         "--allow-url-fetch", "--max-image-pixels", "5000", "--max-upload-bytes", "200000", "--max-wait-ms", "300",
         *common],
        ["--model", str(root / "t5"), *common],
        ["--model", str(root / "instructblip"), "--chat-template", str(root / "template.jinja"), *common],
    ]
    with serve_processes(arguments, env={"QFORMER_API_KEY": KEY}) as running:
        (opt_url, _, _), (t5_url, _, _), (ib_url, _, _) = running
        vqa = "Question: {} Answer:".format
        yield {
            "opt": Served(opt_url, Blip2.from_pretrained(root / "opt"), "blip2-opt", KEY, lambda q, s: vqa(q)),
            "t5": Served(t5_url, Blip2.from_pretrained(root / "t5"), str(root / "t5"), KEY, lambda q, s: vqa(q)),
            "instructblip": Served(ib_url, Blip2.from_pretrained(root / "instructblip"), str(root / "instructblip"),
                                   KEY, lambda q, s: f"{s} {q}" if s else q),
        }


KINDS = ("opt", "t5", "instructblip")


@pytest.mark.parametrize("kind", KINDS)
def test_a_completion_is_generate_texts_answer_and_counts_its_tokens(servers, kind):
    served = servers[kind]
    image = png_bytes(1)
    answer = served.ask(image, max_tokens=10)
    (text,), ids, prompt = served.reference(image, max_new_tokens=10)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    generated = served.generated(ids[0])
    assert choice.finish_reason == ("length" if generated == 10 and ids[0, -1] not in served.model.stop_token_ids()
                                    else "stop")
    prompt_tokens = QUERIES + len(served.model.tokenizer(prompt).input_ids)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, generated)
    assert answer.usage.total_tokens == prompt_tokens + generated
    assert answer.model == served.name and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    unbounded = served.ask(image)  # no max_tokens: what the LLM's positions leave, within --max-new-tokens (12)
    assert unbounded.choices[0].message.content == served.reference(image, max_new_tokens=12)[0][0]


def test_without_max_tokens_a_long_prompt_gets_the_positions_it_leaves(servers):
    served = servers["opt"]  # the tiny OPT has 64 positions: 4 queries, the prompt, then the new tokens
    question = " ".join(["red"] * 50)
    answer = served.ask(png_bytes(1), question)
    room = 64 - answer.usage.prompt_tokens
    assert 0 < room < 12 and answer.usage.completion_tokens <= room
    assert answer.choices[0].message.content == served.reference(png_bytes(1), question, max_new_tokens=room)[0][0]
    with pytest.raises(openai.BadRequestError, match="LLM"):
        served.ask(png_bytes(1), question, max_tokens=12)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_pieces_join_to_the_plain_answer(servers, kind):
    served = servers[kind]
    image = png_bytes(2)
    plain = served.ask(image, max_tokens=10)
    chunks = list(served.ask(image, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content
    words = len(plain.choices[0].message.content.split())
    assert sum(1 for piece in pieces if piece) >= min(words, 2)  # it did stream: the text came in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_sampling_with_a_seed_repeats_and_equals_generate_with_that_seed(servers):
    served = servers["opt"]
    image = png_bytes(3)
    options = dict(max_tokens=8, temperature=1.3, top_p=0.9, n=3, seed=1234)
    first, again = served.ask(image, **options), served.ask(image, **options)
    texts = [c.message.content for c in first.choices]
    assert [c.message.content for c in again.choices] == texts and len(texts) == 3
    torch.manual_seed(1234)
    reference, ids, _ = served.reference(image, max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9, top_k=0,
                                         num_return_sequences=3)
    assert texts == reference
    assert first.usage.completion_tokens == sum(served.generated(row) for row in ids)
    other = served.ask(image, **{**options, "seed": 99})
    assert [c.message.content for c in other.choices] != texts  # the seed is what decides the draw


def test_n_greedy_choices_are_the_greedy_answer_each(servers):
    served = servers["t5"]
    answer = served.ask(png_bytes(4), max_tokens=6, n=2)
    (text,), ids, _ = served.reference(png_bytes(4), max_new_tokens=6)
    assert [c.message.content for c in answer.choices] == [text, text] and [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 2 * served.generated(ids[0])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_the_answer_before_the_stop_text(servers, stream):
    served = servers["opt"]
    image = png_bytes(1)
    full = served.ask(image, max_tokens=12).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2] if words[2] not in words[:2] else " ".join(words[1:3])
    expected = full[:full.index(stop)].strip()
    if stream:
        chunks = list(served.ask(image, max_tokens=12, stop=[stop, "never there"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = served.ask(image, max_tokens=12, stop=stop)
        text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert text == expected and finish == "stop"


def test_logprobs_are_the_models_own(servers):
    served = servers["opt"]
    image = png_bytes(6)
    answer = served.ask(image, max_tokens=6, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    (text,), out, prompt = served.reference(image, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    assert len(content) == answer.usage.completion_tokens
    tokenizer = served.model.tokenizer
    for step, entry in enumerate(content):
        log_softmax = out.logits[step][0].log_softmax(-1)
        token = int(out.sequences[0, step])
        assert entry.token == tokenizer.decode([token]) and entry.bytes == list(entry.token.encode())
        torch.testing.assert_close(torch.tensor(entry.logprob), log_softmax[token], rtol=0, atol=1e-5)
        top = log_softmax.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), top.values, rtol=0, atol=1e-5)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the most likely token each time


def test_the_operators_chat_template_makes_the_prompt_system_message_included(servers):
    served = servers["instructblip"]
    image = png_bytes(7)
    answer = served.client.chat.completions.create(
        model=served.name, messages=asking("what is it", data_url(image), system="be brief"), max_tokens=8)
    (text,), ids, prompt = served.reference(image, "what is it", system="be brief", max_new_tokens=8)
    assert prompt == "be brief what is it"
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == QUERIES + len(served.model.tokenizer(prompt).input_ids)


def test_a_conversation_is_blip2s_question_answer_turns(servers):
    served = servers["t5"]
    image = png_bytes(8)
    messages = asking("what is it", data_url(image)) + [
        {"role": "assistant", "content": "a ball"}, {"role": "user", "content": "what colour is it"}]
    answer = served.client.chat.completions.create(model=served.name, messages=messages, max_tokens=6)
    prompt = "Question: what is it Answer: a ball Question: what colour is it Answer:"
    reference = served.model.generate_text([Image.open(io.BytesIO(image))], [prompt], max_new_tokens=6, num_beams=1,
                                           do_sample=False)
    assert answer.choices[0].message.content == reference[0]
    assert answer.usage.prompt_tokens == QUERIES + len(served.model.tokenizer(prompt).input_ids)


def test_images_from_the_allowed_folder_and_from_urls(servers, media):
    served = servers["opt"]
    expected = served.ask(png_bytes(5), max_tokens=6).choices[0].message.content

    def ask_url(url: str):
        return served.client.chat.completions.create(model=served.name, messages=asking(QUESTION, url), max_tokens=6)

    assert ask_url((media / "photos" / "a.png").as_uri()).choices[0].message.content == expected
    with pytest.raises(openai.BadRequestError, match="outside --allowed-local-media"):
        (media / "photos" / "link.png").symlink_to(Path(__file__).resolve())
        ask_url((media / "photos" / "link.png").as_uri())
    with pytest.raises(openai.BadRequestError, match="gone from"):
        ask_url((media / "photos" / "nothing.png").as_uri())
    with pytest.raises(openai.BadRequestError, match="outside --allowed-local-media"):
        ask_url(Path(__file__).resolve().as_uri())

    class Pictures(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = png_bytes(5) if self.path == "/a.png" else b"no"
            self.send_response(200 if self.path == "/a.png" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{web.server_address[1]}"
        assert ask_url(f"{base}/a.png").choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="answered 404"):
            ask_url(f"{base}/b.png")
    finally:
        web.shutdown()
    with pytest.raises(openai.BadRequestError, match="--allow-url-fetch"):  # the T5 server fetches nothing
        servers["t5"].client.chat.completions.create(model=servers["t5"].name, max_tokens=4,
                                                     messages=asking(QUESTION, "http://127.0.0.1:9/a.png"))


def test_every_refusal_is_the_clients_own_exception_with_the_message(servers):
    served = servers["opt"]
    image = data_url(png_bytes(1))
    create = served.client.chat.completions.create
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "image_url", "image_url": {"url": image}}]}]
    cases = [
        (openai.BadRequestError, "2 images; BLIP-2 reads one image", dict(messages=two)),
        (openai.BadRequestError, "no image", dict(messages=[{"role": "user", "content": "hello"}])),
        (openai.NotFoundError, "The model `gpt-4o` does not exist", dict(model="gpt-4o")),
        (openai.BadRequestError, "over the limit of 5,000 pixels|max_image_pixels",
         dict(messages=asking(QUESTION, data_url(png_bytes(1, (100, 100)))))),
        (openai.BadRequestError, "tools: not supported", dict(extra_body={"tools": [{"type": "function"}]})),
        (openai.BadRequestError, "logit_bias: not supported", dict(logit_bias={"5": 10})),
        (openai.BadRequestError, "max_tokens: 13 is outside 1..12", dict(max_tokens=13)),
        (openai.BadRequestError, "temperature: 3 is outside 0..2", dict(temperature=3)),
        (openai.BadRequestError, "n: a stream carries one choice", dict(n=2, stream=True)),
        (openai.BadRequestError, "input_audio", dict(messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])),
        (openai.BadRequestError, "'tool' is not one of", dict(messages=[{"role": "tool", "content": "x",
                                                                         "tool_call_id": "1"}])),
        (openai.BadRequestError, "over the limit of 1,000 .max_prompt_chars.", dict(messages=asking("x" * 1001, image))),
        (openai.BadRequestError, "stop: a non-empty string", dict(stop=["a", "b", "c", "d", "e"])),
        (openai.BadRequestError, "seed: expected an integer", dict(seed=1.5)),
    ]
    for error, message, options in cases:
        request = {"model": served.name, "messages": asking(QUESTION, image), "max_tokens": 4, **options}
        with pytest.raises(error, match=message) as caught:
            create(**request)
        assert caught.value.body["message"] and caught.value.body["type"], caught.value.body
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    response = httpx.post(f"{served.url}/v1/chat/completions", json={"model": served.name, "messages": []})
    assert response.status_code == 401  # no key at all
    big = data_url(bytes(300_000))
    with pytest.raises(openai.APIStatusError, match="max_upload_bytes") as caught:
        create(model=served.name, messages=asking(QUESTION, big), max_tokens=4)
    assert caught.value.status_code == 413
    # JSON's escapes carry lone surrogates, which the openai client cannot send: sent as raw JSON here
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    body = json.dumps({"model": served.name, "messages": asking(QUESTION, image)})
    for old, new, status, message in (
            (f'"model": "{served.name}"', '"model": "a\\udc80b"', 404, "The model `a\\udc80b` does not exist"),
            (QUESTION, "what \\ud800 is it", 400, "lone surrogate, U+D800")):
        response = httpx.post(f"{served.url}/v1/chat/completions", content=body.replace(old, new), headers=headers)
        assert response.status_code == status and message in response.json()["error"]["message"], response.text
    failures = [line for line in httpx.get(f"{served.url}/metrics").text.splitlines()
                if line.startswith("qformer_requests_total") and 'status="5' in line]
    assert not failures, failures


def test_models_lists_the_served_name(servers):
    assert [m.id for m in servers["opt"].client.models.list()] == ["blip2-opt"]
    assert servers["opt"].client.models.retrieve("blip2-opt").owned_by == "qformer"
    assert [m.id for m in servers["t5"].client.models.list()] == [servers["t5"].name]


def test_concurrent_requests_share_model_calls(servers):
    served = servers["opt"]
    client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    before = httpx.get(f"{served.url}/metrics").text
    name = 'qformer_batch_size_count{route="chat"}'
    calls_before = metric(before, name) if name in before else 0.0

    async def burst() -> list[str]:
        answers = await asyncio.gather(*(client.chat.completions.create(
            model=served.name, messages=asking(QUESTION, data_url(png_bytes(seed))), max_tokens=5)
            for seed in range(6)))
        return [a.choices[0].message.content for a in answers]

    texts = asyncio.run(burst())
    calls = metric(httpx.get(f"{served.url}/metrics").text, name) - calls_before
    assert calls < 6, calls  # six requests, fewer model calls
    assert texts == [served.ask(png_bytes(seed), max_tokens=5).choices[0].message.content for seed in range(6)]


def test_the_native_routes_answer_beside_the_openai_ones(servers):
    response = httpx.post(f"{servers['opt'].url}/vqa", files={"image": ("a.png", png_bytes(1), "image/png")},
                          data={"question": QUESTION, "num_beams": "1", "max_new_tokens": "10"})
    assert response.status_code == 200
    assert response.json()["answer"] == servers["opt"].ask(png_bytes(1), max_tokens=10).choices[0].message.content


def test_penalties_subtract_as_openai_defines_them():
    scores = torch.zeros(2, 6)
    prompt_and_new = torch.tensor([[5, 1, 1, 2], [5, 3, 4, 4]])
    penalties = OpenAIPenalties(presence=0.5, frequency=0.25)
    penalties.start = 1  # the first column is the prompt's, not counted
    out = penalties(prompt_and_new, scores)
    expected = torch.zeros(2, 6)
    expected[0, 1], expected[0, 2] = -(0.5 + 2 * 0.25), -(0.5 + 0.25)
    expected[1, 3], expected[1, 4] = -(0.5 + 0.25), -(0.5 + 2 * 0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reads_instruction, conversation, prompt", [
    (False, [("user", "what is it")], "Question: what is it Answer:"),
    (False, [("user", "")], ""),  # an image alone: the empty prompt, a caption
    (False, [("system", "be brief"), ("user", "what is it")], "be brief Question: what is it Answer:"),
    (False, [("user", "what is it"), ("assistant", "a ball"), ("user", "what colour")],
     "Question: what is it Answer: a ball Question: what colour Answer:"),
    (True, [("user", "what is it")], "what is it"),
    (True, [("system", "be brief"), ("user", ""), ("user", "describe it")], "be brief describe it"),
])
def test_the_default_templates_write_blip2s_prompts(blip2, reads_instruction, conversation, prompt):
    from qformer.serve.chat import default_template
    from qformer.serve.service import ServedModel

    messages = [{"role": role, "content": text} for role, text in conversation]
    assert ServedModel(blip2, "tiny").render_chat(messages, default_template(reads_instruction)) == prompt

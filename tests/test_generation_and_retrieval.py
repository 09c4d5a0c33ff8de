"""Q-Former decoding (greedy, beam, sampling) and stage-1 retrieval scores and recall."""

import itertools

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_qformer
from qformer.generate import DecodingOptions, qformer_generate
from qformer.pretrained.stage1 import extract_features
from qformer.retrieval import caption_images, retrieval_recall, retrieval_scores
from stage1_helpers import tiny_batch, tiny_stage1

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

EOS = 3


def setup(vocab=50, batch=3, seed=0):
    torch.manual_seed(seed)
    model = tiny_qformer(vocab_size=vocab, bos_token_id=vocab - 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # peaked, varied next-token distributions
    queries = torch.randn(batch, 4, 32)
    image_kv = model.encoder_key_values(torch.randn(batch, 5, 24))
    return model, queries, image_kv


def sequence_logprob(model, queries, image_kv, tokens):
    """log p(tokens | image) by one full pass, stopping after eos."""
    bos = torch.full((tokens.shape[0], 1), model.config.bos_token_id)
    ids = torch.cat([bos, tokens], dim=1)
    logits = model(input_ids=ids, query_embeds=queries, encoder_key_values=image_kv, is_decoder=True).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    after_eos = (tokens == EOS).long().cumsum(1) - (tokens == EOS).long() > 0
    return logp.masked_fill(after_eos, 0).sum(1)


def test_greedy_equals_argmax_of_full_passes():
    model, queries, image_kv = setup()
    tokens = qformer_generate(model, queries, image_kv, EOS, options=DecodingOptions(max_new_tokens=6))
    ids = torch.full((3, 1), model.config.bos_token_id)
    for _ in range(tokens.shape[1]):  # no cache: re-run everything each step
        logits = model(input_ids=ids, query_embeds=queries, encoder_key_values=image_kv, is_decoder=True).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[:, 1:]
    for row in range(3):  # equal up to and including eos, padding after
        stop = (expected[row] == EOS).nonzero()
        end = int(stop[0]) + 1 if len(stop) else expected.shape[1]
        assert torch.equal(tokens[row, :end], expected[row, :end])
        assert (tokens[row, end:] == model.config.pad_token_id).all()


def test_exhaustive_beam_search_finds_the_best_sequence():
    vocab, length = 6, 3
    model, queries, image_kv = setup(vocab=vocab, batch=2)
    options = DecodingOptions(max_new_tokens=length, num_beams=vocab**2, length_penalty=0.0)
    best = qformer_generate(model, queries[:1], expand(image_kv, 1), EOS, options=options)
    candidates = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    scores = sequence_logprob(model, queries[:1].expand(len(candidates), -1, -1),
                              expand(image_kv, len(candidates)), candidates)
    assert_close(sequence_logprob(model, queries[:1], expand(image_kv, 1), best), scores.max()[None])
    # beam search is at least as likely as greedy
    greedy = qformer_generate(model, queries[:1], expand(image_kv, 1), EOS, options=DecodingOptions(max_new_tokens=length))
    beam3 = qformer_generate(model, queries[:1], expand(image_kv, 1), EOS,
                             options=DecodingOptions(max_new_tokens=length, num_beams=3, length_penalty=0.0))
    assert sequence_logprob(model, queries[:1], expand(image_kv, 1), beam3) >= sequence_logprob(
        model, queries[:1], expand(image_kv, 1), greedy) - 1e-5


def expand(image_kv, batch):
    return tuple(None if kv is None else (kv[0][:1].expand(batch, -1, -1, -1), kv[1][:1].expand(batch, -1, -1, -1))
                 for kv in image_kv)


@pytest.mark.parametrize("options", [DecodingOptions(max_new_tokens=5), DecodingOptions(max_new_tokens=5, num_beams=3),
                                     DecodingOptions(max_new_tokens=5, num_beams=2, repetition_penalty=1.5,
                                                     min_new_tokens=2)])
def test_batched_equals_one_by_one(options):
    model, queries, image_kv = setup()
    together = qformer_generate(model, queries, image_kv, EOS, options=options)
    for row in range(3):
        kv = tuple(None if x is None else (x[0][row : row + 1], x[1][row : row + 1]) for x in image_kv)
        alone = qformer_generate(model, queries[row : row + 1], kv, EOS, options=options)
        assert torch.equal(together[row, : alone.shape[1]], alone[0])
        assert (together[row, alone.shape[1]:] == model.config.pad_token_id).all()


def test_min_new_tokens_and_sampling():
    model, queries, image_kv = setup()
    tokens = qformer_generate(model, queries, image_kv, EOS, options=DecodingOptions(max_new_tokens=4, min_new_tokens=4))
    assert not (tokens[:, :4] == EOS).any()
    sample = DecodingOptions(max_new_tokens=5, do_sample=True, top_p=0.9)
    torch.manual_seed(1)
    a = qformer_generate(model, queries, image_kv, EOS, options=sample)
    torch.manual_seed(1)
    assert torch.equal(a, qformer_generate(model, queries, image_kv, EOS, options=sample))
    # a nucleus of one token is greedy decoding
    tiny_nucleus = DecodingOptions(max_new_tokens=5, do_sample=True, top_p=1e-6)
    assert torch.equal(qformer_generate(model, queries, image_kv, EOS, options=tiny_nucleus),
                       qformer_generate(model, queries, image_kv, EOS, options=DecodingOptions(max_new_tokens=5)))
    with pytest.raises(ValueError, match="num_beams=1"):
        DecodingOptions(num_beams=2, do_sample=True)


def test_stage1_captions_run_with_beams():
    model = tiny_stage1().eval()
    _, _, features = tiny_batch(2)
    tokens = caption_images(model, model.image_embeds(image_features=features), eos_token_id=EOS)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 30


def test_retrieval_scores_rerank_the_itc_top_k():
    model = tiny_stage1().eval()
    ids, mask, features = tiny_batch(5)
    embeds = model.image_embeds(image_features=features)
    i2t, t2i = retrieval_scores(model, embeds, ids, mask, k=2, chunk=3)
    feats = extract_features(model, embeds, ids, mask)
    sim = model.similarity(feats.image, feats.text)
    # exactly the top-2 ITC candidates are scored, with ITM logit + ITC similarity
    assert ((i2t != -100).sum(1) == 2).all() and ((t2i != -100).sum(1) == 2).all()
    assert torch.equal((i2t != -100), torch.zeros_like(sim, dtype=torch.bool).scatter(1, sim.topk(2, 1).indices, True))

    def expected(i, t):
        kv = model.qformer.encoder_key_values(embeds[i : i + 1])
        itm = model.itm_logits(model.multimodal_pass(ids[t : t + 1], mask[t : t + 1], kv).last_hidden_state)[0, 1]
        return itm + sim[i, t]

    for i, t in (i2t != -100).nonzero().tolist():
        assert_close(i2t[i, t], expected(i, t), rtol=1e-5, atol=1e-5)
    for t, i in (t2i != -100).nonzero().tolist():
        assert_close(t2i[t, i], expected(i, t), rtol=1e-5, atol=1e-5)


def test_recall_on_known_scores():
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2
    text_to_image = torch.tensor([0, 0, 1, 2])
    i2t = torch.tensor([
        [0.1, 0.9, 0.2, 0.0],  # image 0: best text 1 (its own): rank 0
        [0.8, 0.1, 0.5, 0.3],  # image 1: its text 2 ranks 1
        [0.9, 0.8, 0.7, 0.1],  # image 2: its text 3 ranks 3
    ])
    t2i = torch.tensor([
        [0.9, 0.1, 0.0],  # text 0 -> image 0: rank 0
        [0.2, 0.5, 0.1],  # text 1 -> image 0: rank 1
        [0.3, 0.2, 0.1],  # text 2 -> image 1: rank 1
        [0.1, 0.2, 0.3],  # text 3 -> image 2: rank 0
    ])
    r = retrieval_recall(i2t, t2i, text_to_image, ks=(1, 2))
    assert r["txt_r1"] == pytest.approx(100 / 3) and r["txt_r2"] == pytest.approx(200 / 3)
    assert r["img_r1"] == pytest.approx(50.0) and r["img_r2"] == pytest.approx(100.0)
    assert r["r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 50 + 100) / 4)


def test_recall_refuses_a_k_below_the_largest_recall_reported():
    """Below the re-ranking depth every score ties at -100: R@10 with k = 8 would depend on the
    order of ties, so it is refused; k at least 10, or every item a candidate, is fine."""
    i2t, t2i = torch.randn(20, 20), torch.randn(20, 20)
    text_to_image = torch.arange(20)
    with pytest.raises(ValueError, match=r"k = 8 is too shallow: recall@10 ranks the top 10 texts \(of 20\), so it needs k >= 10"):
        retrieval_recall(i2t, t2i, text_to_image, k=8)
    assert retrieval_recall(i2t, t2i, text_to_image, k=10) == retrieval_recall(i2t, t2i, text_to_image)
    small = retrieval_recall(i2t[:6, :6], t2i[:6, :6], torch.arange(6), k=6)  # 6 items, all candidates
    assert small["txt_r10"] == 100.0

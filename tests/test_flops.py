"""The FLOP formulas of qformer.flops against torch's FlopCounterMode on the real modules.

FlopCounterMode does not count the CPU flash kernel of scaled_dot_product_attention, so the
attention runs on SDPA's math backend here (plain matmuls, which it counts); softmax, LayerNorm
and GELU are counted by neither.
"""

import torch
from stage1_helpers import reference_step, tiny_batch, tiny_stage1
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from qformer import flops
from qformer.losses import HardNegatives
from qformer.objective import Stage1Objective


def counted(step) -> tuple[int, int]:
    """Matmul FLOPs of ``step()``'s forward, and of its forward + backward."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = step()
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


def test_qformer_pass_matches_the_counter():
    model = tiny_stage1(vision=False)
    config = model.qformer.config
    batch, text, image_tokens = 3, 7, 5
    ids, mask, features = tiny_batch(batch, text_len=text)  # features need no gradient
    queries = model.queries(batch)
    full_mask = torch.cat([mask.new_ones(batch, queries.shape[1]), mask], dim=1)

    def step():
        out = model.qformer(input_ids=ids, attention_mask=full_mask, query_embeds=queries,
                            encoder_hidden_states=features)
        return out.last_hidden_state.pow(2).mean()

    expected = flops.qformer_pass(config, batch, queries=queries.shape[1], text=text, image_tokens=image_tokens,
                                  image_grad=False)
    assert counted(step) == (expected.forward, expected.total)


def test_stage1_steps_match_the_counter():
    model = tiny_stage1(vision=False)
    batch, text = 4, 7
    ids, mask, features = tiny_batch(batch, text_len=text)
    negatives = HardNegatives(torch.roll(torch.arange(batch), 1), torch.roll(torch.arange(batch), 2),
                              torch.ones(batch, dtype=torch.bool))
    objective = Stage1Objective(model)
    sizes = dict(config=model.qformer.config, batch=batch, text=text, queries=model.config.num_query_tokens,
                 image_tokens=features.shape[1], embed_dim=model.config.embed_dim)

    ours = counted(lambda: objective(ids, mask, image_features=features, negatives=negatives).loss)
    reference = counted(lambda: sum(reference_step(model, ids, mask, features, negatives.image, negatives.text)))
    shared, recomputed = flops.stage1_step(**sizes), flops.stage1_step(**sizes, shared_image_kv=False)
    # the ITM rows with a negative image run their cross-attention again in the backward
    # (checkpointed, see BlockKeyValue): FLOPs the hardware runs, not the model's; on SDPA's
    # math backend the recomputation stops after the scores, the last matmul whose output the
    # backward keeps
    config = model.qformer.config
    cross_layers = sum(config.has_cross_attention(i) for i in range(config.num_hidden_layers))
    again = flops.matmul(batch * sizes["queries"], config.hidden_size, sizes["image_tokens"]).forward * cross_layers
    assert ours == (shared.forward, shared.total + again)
    assert reference == (recomputed.forward, recomputed.total)

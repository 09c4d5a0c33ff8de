"""Tiny stage-1 configs and a plain reference step (separate passes, nothing shared), written
the straightforward way BLIP-2's code reads, to compare the real step with."""

import torch
import torch.nn.functional as F

from qformer.config import Blip2Stage1Config, ImageConfig, QFormerConfig, VisionConfig
from qformer.pretrained.stage1 import Blip2Stage1

IMAGE = 28  # 2 x 2 patches of 14 px + class token = 5 image tokens
IMAGE_CONFIG = ImageConfig(size=IMAGE, mean=(0.5, 0.45, 0.4), std=(0.25, 0.3, 0.2))  # not the defaults


def tiny_stage1_config(vision: bool = True) -> Blip2Stage1Config:
    return Blip2Stage1Config(
        vision=VisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE, patch_size=14) if vision else None,
        qformer=QFormerConfig(vocab_size=50, bos_token_id=49, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
                              encoder_hidden_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        num_query_tokens=4,
        embed_dim=16,
    )


def tiny_stage1(seed: int = 0, vision: bool = True, config: Blip2Stage1Config | None = None) -> Blip2Stage1:
    """A tiny stage-1 model (``config``, else :func:`tiny_stage1_config`) with lively weights
    everywhere, so that a mistake moves the losses."""
    torch.manual_seed(seed)
    model = Blip2Stage1(config or tiny_stage1_config(vision))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name != "temp":
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    return model


def tiny_batch(batch: int, seed: int = 1, text_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49, (batch, text_len), generator=g)
    ids[:, 0] = 2  # stands for [CLS]
    mask = torch.ones(batch, text_len, dtype=torch.long)
    for row in range(batch):
        pad = int(torch.randint(0, 3, (1,), generator=g))
        if pad:
            mask[row, -pad:] = 0
            ids[row, -pad:] = 0
    features = torch.randn(batch, 5, 24, generator=g)
    return ids, mask, features


def reference_step(model: Blip2Stage1, ids, mask, features, neg_image, neg_text, image_ids=None):
    """One process, the whole batch; every pass computes its own image keys/values."""
    qformer = model.qformer
    batch, q = ids.shape[0], model.config.num_query_tokens
    image_embeds = model.ln_vision(features)
    queries = model.query_tokens.expand(batch, -1, -1)
    query_output = qformer(query_embeds=queries, encoder_hidden_states=image_embeds, use_cache=True)
    image_feats = F.normalize(model.vision_proj(query_output.last_hidden_state), dim=-1)
    text_output = qformer(input_ids=ids, attention_mask=mask)
    text_feat = F.normalize(model.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

    temp = model.temp.clamp(0.001, 0.5)
    sim_i2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1).max(-1)[0] / temp
    sim_t2i = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2).max(-1)[0]
    sim_t2i = sim_t2i / temp
    if image_ids is None:
        targets = torch.arange(batch)
    else:
        same = (image_ids[:, None] == image_ids[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
    loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

    image_embeds_neg = torch.stack([image_embeds[int(i)] for i in neg_image])
    text_ids_neg = torch.stack([ids[int(i)] for i in neg_text])
    text_atts_neg = torch.stack([mask[int(i)] for i in neg_text])
    text_ids_all = torch.cat([ids, ids, text_ids_neg])
    text_atts_all = torch.cat([mask, mask, text_atts_neg])
    query_atts = torch.ones(3 * batch, q, dtype=torch.long)
    output_itm = qformer(
        input_ids=text_ids_all,
        query_embeds=model.query_tokens.expand(3 * batch, -1, -1),
        attention_mask=torch.cat([query_atts, text_atts_all], dim=1),
        encoder_hidden_states=torch.cat([image_embeds, image_embeds_neg, image_embeds]),
    )
    logits = model.itm_head(output_itm.last_hidden_state[:, :q]).mean(dim=1)
    itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long()
    loss_itm = F.cross_entropy(logits, itm_labels)

    decoder_ids = ids.clone()
    decoder_ids[:, 0] = qformer.config.bos_token_id
    labels = decoder_ids.masked_fill(mask == 0, -100)
    lm_output = qformer(
        input_ids=decoder_ids,
        attention_mask=torch.cat([torch.ones(batch, q, dtype=torch.long), mask], dim=1),
        past_key_values=query_output.past_key_values,
        is_decoder=True,
        labels=labels,
    )
    return loss_itc, loss_itm, lm_output.loss


def tiny_retrieval_model(vocab_size: int = 50):
    """A tiny random transformers ``Blip2ForImageTextRetrieval`` (the layout of blip2-itm-vit-g)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=14),
        qformer_config=dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=40, encoder_hidden_size=24,
                            use_qformer_text_input=True),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0, 0.3)
    return model


def usable_stage1(tokenizer) -> Blip2Stage1:
    """A tiny stage-1 model whose vocabulary is the real tokenizer's, with that tokenizer."""
    config = tiny_stage1_config()
    qformer = config.qformer.replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    model = tiny_stage1(config=config.replace(qformer=qformer.to_dict(), image=IMAGE_CONFIG.to_dict())).eval()
    model.tokenizer = tokenizer
    return model

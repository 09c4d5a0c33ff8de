"""Image encoders: BLIP-2's EVA ViT-g, and any transformers vision tower behind one interface.

Both map pixels (B, 3, H, W) to tokens (B, S, W) and expose ``width`` and ``image_size`` (the
side of the images they take; None: any). BLIP-2 keeps them frozen, except in its COCO
fine-tuning, where the EVA ViT trains (``gradient_checkpointing`` recomputes its blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from qformer.config import VisionConfig


class VisionAttention(nn.Module):
    """Self-attention with a fused qkv projection; BLIP-2's key bias is zero
    (bias = cat(q_bias, 0, v_bias)), stored fused as in transformers. EVA has no key bias: when
    the encoder trains, the key's third of the fused bias gets no gradient, so it stays as
    loaded (zero in the released models)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def qkv_bias(self) -> Tensor | None:
        """The fused bias (3W,), its key third cut from the graph while it trains."""
        bias = self.qkv.bias
        if bias is None or not bias.requires_grad:
            return bias
        query, key, value = bias.chunk(3)
        return torch.cat([query, key.detach(), value])

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())  # (B, S, 3W)
        qkv = qkv.view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, S, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, S, hs)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))  # (B, S, W)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """EVA ViT-g/14 as BLIP-2 uses it: class token + patches, absolute positions, no final norm
    (BLIP-2's ``ln_vision`` follows, outside the tower). With ``gradient_checkpointing`` in
    training mode, each block's activations are recomputed in backward (non-reentrant)."""

    _no_split_modules = ("VisionBlock",)  # transformers' convention: the blocks FSDP shards one by one

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.hidden_size
        self.image_size = config.image_size
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, config.hidden_size))
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        nn.init.trunc_normal_(self.class_embedding, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        for module in self.modules():  # EVA's init; the key bias starts (and stays, frozen) zero
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def resize(self, image_size: int) -> None:
        """Take ``image_size``-px images: the position table interpolated bicubically, as BLIP-2
        runs its 224-px encoder at 364 px to fine-tune for captions and retrieval."""
        config = self.config.replace(image_size=image_size)  # checked against the patch size
        table = interpolate_position_embedding(self.position_embedding.detach(), config.num_positions)
        self.position_embedding = nn.Parameter(table, requires_grad=self.position_embedding.requires_grad)
        self.config, self.image_size = config, image_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + H/p * W/p, D)."""
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"images are {tuple(pixel_values.shape[-2:])} but the encoder takes {size}x{size}; resize them "
                f"or build the encoder for that size (see interpolate_position_embedding)"
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, 1 + P, D)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.gradient_checkpointing and self.training else layer(x)
        return x


def interpolate_position_embedding(position_embedding: Tensor, num_positions: int) -> Tensor:
    """Resize a (1, 1 + g*g, D) table to (1, num_positions, D) bicubically, as BLIP-2 does to
    run its 224-px encoder at 364 px."""
    old_grid = int(round((position_embedding.shape[1] - 1) ** 0.5))
    new_grid = int(round((num_positions - 1) ** 0.5))
    if old_grid**2 + 1 != position_embedding.shape[1] or new_grid**2 + 1 != num_positions:
        raise ValueError("position tables must hold a class position and a square grid")
    if old_grid == new_grid:
        return position_embedding
    cls, grid = position_embedding[:, :1], position_embedding[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(position_embedding.dtype)  # (1, G, D)
    return torch.cat([cls, grid], dim=1)


class TransformersVisionTower(nn.Module):
    """Any transformers vision model (``CLIPVisionModel``, ``SiglipVisionModel``, ...) as an
    image encoder: all of its last hidden state's tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.width = model.config.hidden_size
        self.image_size: int | None = getattr(model.config, "image_size", None)

    def forward(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # (B, S, W)

"""A decoder-only Transformer: autoregressive conditionals from causal self-attention
(Vaswani et al. 2017; the GPT decoder of Radford et al. 2018/2019).

With inputs shifted right by one (``ShiftedEmbedding``: position 0 reads a learned START
vector, position ``t > 0`` an embedding of ``x_{t-1}``) plus learned position embeddings
``P_t``, ``L`` pre-LN blocks (Xiong et al. 2020, as in GPT-2) map ``h^0_t = e_t + P_t`` to::

    u = h + Attn(LN(h)),   h' = u + MLP(LN(u)),   logits_t = W LN(h^L_t) + b,

where multi-head attention of position ``t`` averages the values of positions ``s <= t``
only: ``softmax_s(q_t . k_s / sqrt(d_head) + log M_ts)`` with the causal mask
``M_ts = [s <= t]`` (a buffer, ``causal_mask``). Position ``t`` therefore sees
``e_0..e_t``, i.e. START and ``x_<t``, and nothing later: every conditional is causal and
one pass over the data gives all of them. Sampling runs ``T`` passes, the ``t``-th on the
prefix of length ``t + 1`` (no key/value cache: O(T^2) attention per sample, fine for
names and 8x8 digits; MNIST's 784 steps want a GPU).

Data, as for the char-RNN (:mod:`models.autoregressive.sequence`): END-padded strings
(names), or any binary / categorical data flattened in raster order, Bernoulli or
categorical outputs (8x8 digits: 64 positions; MNIST: 784; digits17: 17 levels), as in the
Image Transformer (Parmar et al. 2018) without its local attention.

Presets: ``small`` (tests, CPU), ``names``, and ``mnist`` (4 blocks of width 128 over the
784 pixels: a small GPT, not a published MNIST architecture; PixelCNN-class models reach
about 81 nats there, see BENCHMARKS.md).

References: A. Vaswani et al., "Attention is all you need", NeurIPS 2017; A. Radford et
al., "Language models are unsupervised multitask learners", 2019; R. Xiong et al., "On
layer normalization in the Transformer architecture", ICML 2020; N. Parmar et al., "Image
Transformer", ICML 2018.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.autoregressive.sequence import SequenceModel, ShiftedEmbedding, sequence_for
from models.base import DataSpec, DGMError
from models.registry import register_model

__all__ = ["Transformer", "TransformerConfig", "PRESETS", "Block"]


@dataclass
class TransformerConfig:
    """``width``: model dimension ``d``; ``heads`` divide it; ``blocks``: depth ``L``;
    ``mlp_ratio``: hidden size of each block's MLP over ``d``; ``dropout``: on attention
    weights and residual branches; ``sequence``: auto, tokens or raster (see
    :func:`~models.autoregressive.sequence.sequence_for`)."""

    width: int = 64
    heads: int = 4
    blocks: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.0
    sequence: str = "auto"


PRESETS = {
    "small": TransformerConfig(width=32, heads=2, blocks=2),
    "names": TransformerConfig(width=128, heads=4, blocks=4, dropout=0.3),
    "mnist": TransformerConfig(width=128, heads=4, blocks=4),
}


class Block(nn.Module):
    """One pre-LN block: ``h + Attn(LN(h))``, then ``+ MLP(LN(.))``, attention masked by
    the boolean ``mask [T, T]`` passed in (True = may attend)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [b, heads, t, d_head]
        h = h + self.drop(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return h + self.drop(self.mlp(self.ln2(h)))


@register_model
class Transformer(SequenceModel):
    """Causal Transformer decoder for END-padded strings or raster-scanned discrete data."""

    name = "transformer"
    config_class = TransformerConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[TransformerConfig] = None):
        super().__init__(data_spec)
        self.config = config = config or TransformerConfig()
        if min(config.width, config.heads, config.blocks, config.mlp_ratio) < 1:
            raise DGMError(f"width, heads, blocks and mlp_ratio must be >= 1, got {config}")
        if config.width % config.heads:
            raise DGMError(f"width {config.width} is not divisible by heads {config.heads}")
        if not 0 <= config.dropout < 1:
            raise DGMError(f"dropout must be in [0, 1), got {config.dropout}")
        self.sequence = sequence_for(data_spec, config.sequence, "Transformer")
        length, levels = data_spec.dim, self.sequence.levels
        self.embed = ShiftedEmbedding(levels, config.width)
        self.position = nn.Parameter(torch.randn(length, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.blocks)
        )
        self.ln = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, levels)
        self.drop = nn.Dropout(config.dropout)
        self.register_buffer("causal_mask", torch.ones(length, length, dtype=torch.bool).tril())

    def logits(self, features: Tensor, context: Optional[Tensor] = None) -> Tensor:
        t = features.shape[1]  # context: always None (unconditional; SequenceModel checks)
        h = self.drop(self.embed(features) + self.position[:t])
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln(h))

    def step(self, x: Tensor, t: int, state, context: Optional[Tensor] = None):
        """Recompute the prefix (``x[:, t]`` is not read: the inputs are shifted)."""
        return self.logits(self.sequence.features(x[:, : t + 1]))[:, t], None

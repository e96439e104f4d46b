"""Sigmoid belief network (Neal 1992) with a layer-wise recognition network (NVIL, Mnih &
Gregor 2014).

Generative program, for layers listed top-down as ``layers = (L_T, ..., L_1)`` (so
``(200, 200)`` is the 200-200-784 net of the papers) and binary ``x`` in ``{0, 1}^D``::

    h_T ~ Bernoulli(sigmoid(c))                              # learned prior logits
    h_l | h_{l+1} ~ Bernoulli(sigmoid(W_l h_{l+1} + b_l))    # l = T-1, ..., 1
    x | h_1 ~ Bernoulli(sigmoid(W_0 h_1 + b_0))

Every unit of a layer is conditionally independent given the layer above. Sites are named
``h1`` (next to ``x``) to ``hT`` (top), each one vector of bits per datapoint.

Default guide: a sigmoid belief net running upwards,
``q(h_1 | x) q(h_2 | h_1) ... q(h_T | h_{T-1})`` with
``q(h_l | h_{l-1}) = Bernoulli(sigmoid(A_l h_{l-1} + a_l))`` and ``h_0 = x``. No site is
reparameterizable: train with score-function gradients (``elbo-sf`` with a baseline).

Exact ``log p(x)``: for ``H = L_1 + ... + L_T <= MAX_EXACT_BITS`` latent bits the model
enumerates all ``2^H`` configurations at once,
``log p(x) = logsumexp_h [log p(h) + log p(x | h_1)]``, where
``log p(x | h_1) = x . l(h_1) - sum_d softplus(l_d(h_1))`` for logits ``l``, so the
``[B, 2^H]`` table costs one matrix product and never a ``[B, 2^H, D]`` tensor. Larger nets
have ``has_exact_log_prob = False`` and are scored by importance sampling.

Published negative ELBOs on MNIST test (Gu et al. 2016, MuProp, Table 3): SBN 200-784
113.5 (NVIL), SBN 200-200-784 99.7 (NVIL).

References: R. M. Neal, "Connectionist learning of belief networks", Artificial
Intelligence 56, 1992; A. Mnih and K. Gregor, "Neural variational inference and learning
in belief networks", ICML 2014; S. Gu, S. Levine, I. Sutskever and A. Mnih, "MuProp:
unbiased backpropagation for stochastic neural networks", ICLR 2016.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import DataError, DataSpec, DGMError, GenerativeModel
from models.nn import likelihood_for
from models.registry import register_model

__all__ = ["SBN", "SBNConfig", "PRESETS", "MAX_EXACT_BITS", "all_binary_vectors"]

MAX_EXACT_BITS = 12
"""Nets with at most this many latent bits in total enumerate them for an exact log p(x)."""


@dataclass
class SBNConfig:
    """``layers``: latent layer sizes, top layer first; ``init_scale``: standard deviation of
    the initial weights of both networks."""

    layers: Tuple[int, ...] = (200,)
    init_scale: float = 0.01


PRESETS = {
    "tiny": SBNConfig(layers=(10,)),
    "small": SBNConfig(layers=(50,)),
    "mnist-1layer": SBNConfig(layers=(200,)),
    "mnist-2layer": SBNConfig(layers=(200, 200)),
}


def all_binary_vectors(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Every vector of ``{0, 1}^n`` once, ``[2^n, n]`` (row ``i`` is ``i`` in binary)."""
    codes = torch.arange(2**n, device=device)
    bits = 2 ** torch.arange(n - 1, -1, -1, device=device)
    return (codes.unsqueeze(-1) & bits).ne(0).to(dtype)


def _bernoulli_log_prob(logits: Tensor, value: Tensor) -> Tensor:
    """``sum_i log Bernoulli(value_i; sigmoid(logits_i))`` over the last dim, broadcasting."""
    logits, value = torch.broadcast_tensors(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


@register_model
class SBN(GenerativeModel):
    """Sigmoid belief network with binary latent layers and binary pixels."""

    name = "sbn"
    config_class = SBNConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[SBNConfig] = None):
        super().__init__(data_spec)
        config = config or SBNConfig()
        if data_spec.support != "binary":
            raise DataError(
                f"a sigmoid belief net models binary pixels, not {data_spec.describe()}; binarize the data "
                "(e.g. --binarization dynamic)"
            )
        if not config.layers or any(int(n) < 1 for n in config.layers):
            raise DGMError(f"layers must be a non-empty tuple of positive sizes (top first), got {config.layers}")
        self.config = config
        top_down = [int(n) for n in config.layers]
        self.sizes: List[int] = top_down[::-1]  # sizes[l - 1] is the size of h_l (h_1 next to x)
        d = data_spec.dim
        self.likelihood = likelihood_for(data_spec)
        self.prior_logits = nn.Parameter(torch.zeros(self.sizes[-1]))
        below = [d] + self.sizes[:-1]
        # decoders[l] maps h_{l+1} to the logits of the layer below it (l = 0: the pixels)
        self.decoders = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.sizes, below))
        # encoders[l] maps the layer below (x for l = 0) to the logits of q(h_{l+1} | .)
        self.encoders = nn.ModuleList(nn.Linear(b, a) for a, b in zip(self.sizes, below))
        for layer in [*self.decoders, *self.encoders]:
            nn.init.normal_(layer.weight, std=config.init_scale)
            nn.init.zeros_(layer.bias)

    @property
    def num_latent_bits(self) -> int:
        return sum(self.sizes)

    @property
    def has_exact_log_prob(self) -> bool:  # an instance property: depends on the layer sizes
        return self.num_latent_bits <= MAX_EXACT_BITS

    @staticmethod
    def site(layer: int) -> str:
        """Site name of latent layer ``layer`` (1 is next to ``x``)."""
        return f"h{layer}"

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).to(self.prior_logits.dtype)

    # --- the Pyro program -------------------------------------------------------------------
    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            h = pyro.sample(self.site(len(self.sizes)), dist.Bernoulli(logits=self.prior_logits).to_event(1))
            for layer in range(len(self.sizes) - 1, 0, -1):
                h = pyro.sample(self.site(layer), dist.Bernoulli(logits=self.decoders[layer](h)).to_event(1))
            pyro.sample("x", self.likelihood(self.decoders[0](h)), obs=x)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        h = self._flat(x)
        with self.data_plate(x, idx, size):
            for layer, encoder in enumerate(self.encoders, start=1):
                h = pyro.sample(self.site(layer), dist.Bernoulli(logits=encoder(h)).to_event(1))

    # --- densities of given configurations (exact enumeration, tests) -----------------------
    def log_joint(self, x: Tensor, hs: Sequence[Tensor]) -> Tensor:
        """``log p(x, h)`` for ``hs = [h_1, ..., h_T]``, broadcasting leading dims of
        ``x [..., D]`` (flattened pixels) and the layers ``[..., L_l]``."""
        return self.log_joint_latents(hs) + _bernoulli_log_prob(self.decoders[0](hs[0]), x)

    def guide_log_prob(self, x: Tensor, hs: Sequence[Tensor]) -> Tensor:
        """``log q(h | x)`` of the default guide, broadcasting as :meth:`log_joint`."""
        self._check_layers(hs)
        below = [x, *hs[:-1]]
        return sum(_bernoulli_log_prob(enc(b), h) for enc, b, h in zip(self.encoders, below, hs))

    def _check_layers(self, hs: Sequence[Tensor]) -> None:
        if [h.shape[-1] for h in hs] != self.sizes:
            raise DGMError(f"expected layers of sizes {self.sizes} (h_1 first), got {[h.shape[-1] for h in hs]}")

    def enumerate_latents(self) -> List[Tensor]:
        """All ``2^H`` joint configurations, split into layers ``[h_1, ..., h_T]``, each
        ``[2^H, L_l]``."""
        ref = self.prior_logits
        return list(all_binary_vectors(self.num_latent_bits, ref.dtype, ref.device).split(self.sizes, dim=-1))

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x) = logsumexp_h log p(x, h)`` by enumerating all ``2^H`` latent
        configurations (only for ``H <= MAX_EXACT_BITS``)."""
        if not self.has_exact_log_prob:
            raise DGMError(
                f"this SBN has {self.num_latent_bits} latent bits, too many to enumerate (at most "
                f"{MAX_EXACT_BITS}); estimate log p(x) with --estimator is (or naive)"
            )
        hs = self.enumerate_latents()
        log_prior = self.log_joint_latents(hs)  # [C]
        logits = self.decoders[0](hs[0])  # [C, D]
        log_lik = self._flat(x) @ logits.T - F.softplus(logits).sum(-1)  # [B, C]
        return torch.logsumexp(log_lik + log_prior, dim=-1)

    def log_joint_latents(self, hs: Sequence[Tensor]) -> Tensor:
        """``log p(h)`` of latent configurations ``[h_1, ..., h_T]``."""
        self._check_layers(hs)
        lp = _bernoulli_log_prob(self.prior_logits, hs[-1])
        for layer in range(1, len(hs)):
            lp = lp + _bernoulli_log_prob(self.decoders[layer](hs[layer]), hs[layer - 1])
        return lp

    # --- everything else ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` ancestral samples; ``mean=True`` returns the pixel probabilities instead."""
        h = torch.bernoulli(torch.sigmoid(self.prior_logits).expand(n, -1))
        for layer in range(len(self.sizes) - 1, 0, -1):
            h = torch.bernoulli(torch.sigmoid(self.decoders[layer](h)))
        raw = self.decoders[0](h)
        return self.likelihood.mean(raw) if mean else self.likelihood(raw).sample()

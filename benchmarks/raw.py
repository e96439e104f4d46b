"""The hand-written PyTorch reference every contender is compared with.

Same model, same math, no Pyro: the VAE's own ``encoder`` and ``decoder`` modules, the
reparameterized Gaussian guide and the Bernoulli likelihood written out. ``eps`` is drawn
with ``Tensor.normal_``, the call ``Normal.rsample`` makes, so with the same seed the raw
code and the Pyro programs see the same noise (which the benchmarks assert before timing).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import DataSpec
from models.latent.vae import PRESETS, VAE

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def build_vae(seed: int, preset: str = "mlp-400-20") -> VAE:
    """The benchmarked model: ``VAE`` on binary 784-dim data (random init from ``seed``)."""
    torch.manual_seed(seed)
    return VAE(DataSpec((784,), "binary"), PRESETS[preset])


def raw_log_weights(model: VAE, x: Tensor, k: Optional[int], detach_z: bool = False) -> Tuple[Tensor, Tensor]:
    """``(log w, log q)``, each ``[B]`` (``k=None``) or ``[K, B]``::

    (loc, scale) = (enc(x)[:L], softplus(enc(x)[L:]) + 1e-4),  z = loc + scale * eps
    log w = log Bern(x | logits = dec(z)) + log N(z; 0, I) - log N(z; loc, scale)
    """
    loc, raw_scale = model.encoder(x).chunk(2, dim=-1)
    scale = F.softplus(raw_scale) + model.config.min_posterior_scale
    shape = loc.shape if k is None else (k,) + tuple(loc.shape)
    eps = torch.empty(shape, dtype=loc.dtype).normal_()
    z = loc + eps * scale
    if detach_z:
        z = z.detach()
    logits = model.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    log_prior = (-0.5 * z * z - HALF_LOG_2PI).sum(-1)
    log_q = (-((z - loc) ** 2) / (2 * scale**2) - scale.log() - HALF_LOG_2PI).sum(-1)
    return log_lik + log_prior - log_q, log_q


def raw_importance(model: VAE, x: Tensor, num_samples: int, chunk: int) -> Tensor:
    """IS estimate of log p(x) ``[B]`` (float64): ``logsumexp_k log w_k - log K`` over
    ``num_samples`` draws from the encoder, ``chunk`` at a time, combined with
    ``logaddexp``."""
    acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
    done = 0
    with torch.no_grad():
        while done < num_samples:
            k = min(chunk, num_samples - done)
            log_w, _ = raw_log_weights(model, x, k)
            acc = torch.logaddexp(acc, torch.logsumexp(log_w.double(), dim=0))
            done += k
    return acc - math.log(num_samples)

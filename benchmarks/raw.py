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


def raw_sigmoid_schedule(steps: int, radius: float = 4.0) -> list:
    """``beta_0 = 0, ..., beta_T = 1``: ``sigmoid(radius (2 t / T - 1))`` rescaled to ``[0, 1]``."""

    def s(t: int) -> float:
        return 1.0 / (1.0 + math.exp(-radius * (2.0 * t / steps - 1.0)))

    return [0.0] + [(s(t) - s(0)) / (s(steps) - s(0)) for t in range(1, steps)] + [1.0]


def raw_ais(
    model: VAE,
    x: Tensor,
    steps: int,
    chains: int,
    leapfrog: int,
    step_size: float = 0.01,
    adapt: bool = True,
    autograd_prior: bool = False,
) -> Tensor:
    """AIS with HMC from the prior of ``model`` (a Bernoulli ``VAE``), written out: ``log p(x)``
    ``[B]`` (float64). Chains ``z [C, B, L]``, ``f(z) = log p(x | z)``, ``base(z) = log N(z; 0, I)``,
    the sigmoid schedule, ``log w += (beta_t - beta_{t-1}) f(z)`` before each of the ``T - 1``
    transitions; HMC with ``L`` leapfrog steps, identity mass, one step size per datapoint
    adapted toward 65% acceptance (x1.02 / x0.98, clipped to [1e-4, 0.5]). The random numbers
    are drawn in the order ``inference.ais`` draws them: ``z_0``, then per transition the
    momenta ``randn [C, B, L]`` and the uniforms ``rand [C, B]`` (float64).

    The prior's gradient is ``-z`` in closed form; ``autograd_prior=True`` takes it by autograd
    instead, as a target built from a program must (``inference.ais``): the same numbers, a
    few more ``[C, B, L]`` temporaries per evaluation (what ``benchmarks.ais`` uses to show
    how glibc's heap trimming reacts to them)."""
    b, dim = x.shape[0], model.config.latent_dim
    betas = raw_sigmoid_schedule(steps)

    def parts(z: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """``(base, f, d base / dz, d f / dz)`` at ``z``; ``d base / dz`` is None in closed form."""
        g_base = None
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            logits = model.decoder(z)
            f = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
            if autograd_prior:
                base = (-0.5 * z * z - HALF_LOG_2PI).sum(-1)
                (g_base,) = torch.autograd.grad(base.sum(), z)
            (g_f,) = torch.autograd.grad(f.sum(), z)
        if not autograd_prior:
            base = (-0.5 * z * z - HALF_LOG_2PI).sum(-1)
        return base.detach(), f.detach(), g_base, g_f

    def prior_grad(z: Tensor, g_base: Optional[Tensor]) -> Tensor:
        return -z if g_base is None else g_base

    with torch.no_grad():
        zeros = x.new_zeros(chains, b, dim)
        z = torch.normal(zeros, torch.ones_like(zeros))
        base, f, g_base, g_f = parts(z)
        log_w = torch.zeros(chains, b, dtype=torch.float64)
        eps = torch.full((b,), step_size, dtype=torch.float64)
        for t in range(1, steps + 1):
            beta = betas[t]
            log_w += (beta - betas[t - 1]) * f.double()
            if t == steps:
                break
            e = eps.to(z.dtype).view(1, -1, 1)
            p0 = torch.randn_like(z)
            p = p0 + 0.5 * e * (prior_grad(z, g_base) + beta * g_f)
            q = z
            for i in range(leapfrog):
                q = q + e * p
                base_new, f_new, g_base_new, g_f_new = parts(q)
                grad = prior_grad(q, g_base_new) + beta * g_f_new
                p = p + (e if i < leapfrog - 1 else 0.5 * e) * grad
            h0 = (base + beta * f).double() - 0.5 * p0.double().pow(2).sum(-1)
            h1 = (base_new + beta * f_new).double() - 0.5 * p.double().pow(2).sum(-1)
            log_ratio = h1 - h0
            log_ratio = torch.where(torch.isnan(log_ratio), -math.inf, log_ratio)
            accepted = torch.log(torch.rand(log_ratio.shape, dtype=torch.float64)) < log_ratio
            keep = accepted.unsqueeze(-1)
            z, g_f = torch.where(keep, q, z), torch.where(keep, g_f_new, g_f)
            base, f = torch.where(accepted, base_new, base), torch.where(accepted, f_new, f)
            if autograd_prior:
                g_base = torch.where(keep, g_base_new, g_base)
            if adapt:
                rate = accepted.double().mean(0)
                eps = (eps * torch.where(rate > 0.65, 1.02, 0.98).double()).clamp(1e-4, 0.5)
    return torch.logsumexp(log_w, 0) - math.log(chains)

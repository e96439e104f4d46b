"""Estimators of log p(x), one value per datapoint, with standard error and diagnostics.

* ``exact``: the model's own ``log_prob`` (autoregressive models, flows, PPCA, mixtures).
* ``naive``: naive Monte Carlo with the prior as proposal,
  ``log (1/K) sum_k p(x | z_k)``, ``z_k ~ p(z)``.
* ``is``: importance sampling with the guide as proposal,
  ``log (1/K) sum_k p(x, z_k) / q(z_k | x)``, ``z_k ~ q(z | x)``.

Both sampling estimators are consistent and, by Jensen, biased low for finite K
(``E[log p_hat] <= log p(x)``); they equal the IWAE_K bound evaluated with K samples.

The K samples are drawn in chunks and reduced with a streaming logsumexp, so memory does
not grow with K (only the ``M ~ 3 sqrt(K)`` largest log-weights per datapoint are kept, for
the Pareto tail fit). Accumulators are float64, so K = 1e5 stays finite in float32 models.

Diagnostics per datapoint:
* ``stderr``: delta-method standard error of ``log p_hat``:
  ``sqrt(Var[w] / K) / mean(w) = sqrt(1 / ESS - 1 / K)``.
* ``ess``: ``(sum w)^2 / sum w^2``.
* ``khat``: the Pareto shape of the weights' upper tail (PSIS, Vehtari et al. 2024), fitted
  with ArviZ's generalized-Pareto fit on the same tail ArviZ's ``psislw`` uses; k > 0.7
  means the estimate is unreliable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from arviz.stats.stats import _gpdfit  # the GPD fit behind az.psislw; tested against it
from torch import Tensor
from tqdm.auto import tqdm

from inference.logweights import compute_log_weights
from models.base import DGMError

METHODS = ("exact", "naive", "is")


@dataclass
class Estimate:
    """Per-datapoint log p(x) estimates (nats) and diagnostics, each ``[N]``."""

    log_px: Tensor
    stderr: Tensor
    ess: Tensor
    khat: Tensor
    elbo: Tensor  # mean log-weight over the K samples (the ELBO's MC estimate); nan for exact
    method: str
    num_samples: int

    def summary(self) -> dict:
        n = self.log_px.numel()
        khat = self.khat[torch.isfinite(self.khat)]
        return {
            "estimator": self.method,
            "K": self.num_samples,
            "n": n,
            "nll": float(-self.log_px.mean()),
            # standard error of the dataset mean: spread over datapoints, plus MC error
            "nll_stderr": float(self.log_px.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "mc_stderr_mean": float(self.stderr.mean()),
            "ess_mean": float(self.ess.mean()),
            "elbo": float(self.elbo.mean()),
            "khat_mean": float(khat.mean()) if khat.numel() else float("nan"),
            "khat_frac_above_0.7": float((self.khat > 0.7).float().mean()),
        }

    @staticmethod
    def cat(parts: list) -> "Estimate":
        first = parts[0]
        return Estimate(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("log_px", "stderr", "ess", "khat", "elbo")),
            method=first.method,
            num_samples=first.num_samples,
        )


def tail_size(k: int) -> int:
    """Number of largest log-weights kept: ArviZ's PSIS tail length plus its cutoff."""
    return int(math.ceil(min(k / 5.0, 3 * math.sqrt(k)))) + 1


def pareto_khat(tail: Tensor, k: int) -> Tensor:
    """PSIS k-hat per column from the ``tail_size(k)`` largest log-weights ``[M, B]``.

    Same tail and fit as ``arviz.psislw`` on all K weights (weights at the cutoff or
    below do not enter the fit, so keeping the largest M is enough).
    """
    out = np.full(tail.shape[1], np.inf)
    arr = tail.detach().double().cpu().numpy()
    cutoffmin = np.log(np.finfo(float).tiny)
    for b in range(arr.shape[1]):
        x = np.sort(arr[:, b])
        x = x - x[-1]
        cutoff = max(x[0], cutoffmin)
        t = x[x > cutoff]
        if len(t) > 4:
            with np.errstate(over="ignore"):  # ArviZ's fit overflows harmlessly for flat tails
                out[b] = _gpdfit(np.exp(t) - np.exp(cutoff))[0]
    return torch.as_tensor(out)


def importance(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    num_samples: int,
    idx: Optional[Tensor] = None,
    size: Optional[int] = None,
    max_plate_nesting: int = 1,
    chunk_size: Optional[int] = None,
    max_rows: int = 1 << 15,
    khat: bool = True,
    conditions: Optional[Dict[str, Tensor]] = None,
) -> Estimate:
    """IS estimate of log p(x) for one batch ``x``; ``guide=None`` is the naive estimator.

    Samples are drawn ``chunk_size`` at a time (default: ``max_rows // B``). ``conditions``
    (e.g. ``{"y": labels}``, one row per row of ``x``) go to model and guide as keywords.
    """
    if num_samples < 1:
        raise DGMError(f"the number of samples K must be >= 1, got {num_samples}")
    b = x.shape[0]
    chunk = chunk_size or max(1, min(num_samples, max_rows // max(b, 1)))
    m = tail_size(num_samples) if khat else 0
    run_max = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    s1 = torch.zeros(b, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(b, dtype=torch.float64, device=x.device)
    total = torch.zeros(b, dtype=torch.float64, device=x.device)
    tail = torch.empty(0, b, dtype=torch.float64, device=x.device)
    kwargs = {"idx": idx, "size": size} if idx is not None else {}
    kwargs.update(conditions or {})
    done = 0
    with torch.no_grad():
        while done < num_samples:
            k = min(chunk, num_samples - done)
            lw = compute_log_weights(
                model, guide, (x,), kwargs, num_particles=k, max_plate_nesting=max_plate_nesting
            ).log_w.double()
            if torch.isnan(lw).any():
                raise DGMError("log-weights are NaN: the model or guide produced invalid densities")
            new_max = torch.maximum(run_max, lw.max(0).values)
            shift = torch.where(torch.isfinite(run_max), run_max - new_max, torch.zeros_like(run_max))
            s1 = s1 * shift.exp() + (lw - new_max).exp().sum(0)
            s2 = s2 * (2 * shift).exp() + (2 * (lw - new_max)).exp().sum(0)
            run_max = new_max
            total = total + lw.sum(0)
            if m:
                tail = torch.cat([tail, lw]).topk(min(m, tail.shape[0] + k), dim=0).values
            done += k
    log_px = run_max + s1.log() - math.log(num_samples)
    ess = s1**2 / s2
    stderr = (1.0 / ess - 1.0 / num_samples).clamp_min(0).sqrt()
    kh = pareto_khat(tail, num_samples) if m else torch.full((b,), float("nan"), dtype=torch.float64)
    elbo = total / num_samples
    return Estimate(
        log_px.cpu(), stderr.cpu(), ess.cpu(), kh.cpu(), elbo.cpu(), "is" if guide else "naive", num_samples
    )


def exact(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> Estimate:
    with torch.no_grad():
        lp = log_prob(x).double().cpu()
    zeros = torch.zeros_like(lp)
    nan = torch.full_like(lp, float("nan"))
    return Estimate(lp, zeros, torch.full_like(lp, float("inf")), nan, nan, "exact", 0)


def estimate_dataset(
    model,
    data: Tensor,
    *,
    method: str,
    num_samples: int = 1000,
    guide: Optional[Callable] = None,
    batch_size: int = 100,
    progress: bool = True,
    conditions: Optional[Dict[str, Tensor]] = None,
    **kwargs,
) -> Estimate:
    """Estimate log p(x) for every row of ``data`` with ``method`` (``exact|naive|is``).

    ``model`` is a ``GenerativeModel``; ``guide`` defaults to its amortized guide. The
    guide is called with dataset indices ``idx`` so per-datapoint guides fitted on
    ``data`` work unchanged. ``conditions`` (e.g. ``{"y": labels}`` for a model with
    ``uses_labels``) are tensors with one row per row of ``data``, sliced like it and passed
    to model and guide (and to ``log_prob`` for ``exact``) as keyword arguments.
    """
    if method not in METHODS:
        raise DGMError(f"unknown estimator {method!r}; choose from {', '.join(METHODS)}")
    if method == "exact" and not model.has_exact_log_prob:
        raise DGMError(f"{type(model).__name__} has no exact log p(x); use --estimator is (or naive)")
    n = data.shape[0]
    conditions = conditions or {}
    for key, value in conditions.items():
        if value.shape[:1] != (n,):
            raise DGMError(f"condition {key!r} has {list(value.shape)[:1]} rows, the data {n}; give one per datapoint")
    parts = []
    bar = tqdm(total=n, desc=f"log p(x) [{method}]", disable=not progress, leave=False, mininterval=2.0)
    for start in range(0, n, batch_size):
        x = data[start : start + batch_size]
        cond = {key: value[start : start + batch_size] for key, value in conditions.items()}
        if method == "exact":
            parts.append(exact(functools.partial(model.log_prob, **cond) if cond else model.log_prob, x))
        else:
            idx = torch.arange(start, start + x.shape[0], device=x.device)
            proposal = None if method == "naive" else (guide or model.guide)
            parts.append(
                importance(
                    model.model,
                    proposal,
                    x,
                    num_samples=num_samples,
                    idx=idx,
                    size=n,
                    max_plate_nesting=model.max_plate_nesting,
                    conditions=cond,
                    **kwargs,
                )
            )
        bar.update(x.shape[0])
    bar.close()
    return Estimate.cat(parts)

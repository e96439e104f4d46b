"""Estimators of log p(x), one value per datapoint, with standard error and diagnostics.

Every estimator is an :class:`Estimator` registered in ``ESTIMATORS``, built from an
``EvalConfig`` and called through one signature,
``estimate(model, x, guide=..., idx=..., size=..., conditions=...) -> Estimate`` for one
batch; :func:`estimate_dataset` runs any of them over a dataset in batches. Each declares
the ``EvalConfig`` fields it uses (``settings``), whether it proposes from a guide
(``uses_guide``), and the summary fields it reports.

* ``exact``: the model's own ``log_prob`` (autoregressive models, flows, PPCA, mixtures).
* ``naive``: naive Monte Carlo with the prior as proposal,
  ``log (1/K) sum_k p(x | z_k)``, ``z_k ~ p(z)``.
* ``is``: importance sampling with the guide as proposal,
  ``log (1/K) sum_k p(x, z_k) / q(z_k | x)``, ``z_k ~ q(z | x)``.
* ``ais``: annealed importance sampling with HMC, in ``inference.ais``.
* ``nested``: for models with global latent sites (outside the data plate), the test log
  predictive density of each datapoint, ``log p(x | X) = log E_{p(theta | X)}[p(x | theta)]``,
  with the posterior of the globals replaced by their guide ``q(theta)``: for ``s = 1..S``
  draw ``theta_s ~ q(theta)``, estimate ``p(x | theta_s)`` by IS over the local latents with
  K samples, ``p_hat_s(x) = (1/K) sum_k p(x, z_k | theta_s) / q(z_k | x, theta_s)``, and
  return ``log (1/S) sum_s p_hat_s(x)``. Each ``p_hat_s`` is unbiased for ``p(x | theta_s)``,
  so the estimate is consistent in S (any K) for ``log E_q(theta)[p(x | theta)]``, which is
  ``log p(x | X)`` when ``q(theta)`` is the exact posterior, and biased low by Jensen for
  finite S. ``is`` and ``naive`` refuse such models (their bound is per datapoint).

Both sampling estimators are consistent and, by Jensen, biased low for finite K
(``E[log p_hat] <= log p(x)``); they equal the IWAE_K bound evaluated with K samples.

The K samples are drawn in chunks and reduced with a streaming logsumexp, so memory does
not grow with K (only the ``M ~ 3 sqrt(K)`` largest log-weights per datapoint are kept, for
the Pareto tail fit). Accumulators are float64, so K = 1e5 stays finite in float32 models.

Diagnostics per datapoint:
* ``stderr``: delta-method standard error of ``log p_hat``:
  ``sqrt(Var[w] / K) / mean(w) = sqrt(1 / ESS - 1 / K)``.
* ``ess``: ``(sum w)^2 / sum w^2``.
* (``nested``: ``stderr`` and ``ess`` are over the S draws, weights ``p_hat_s(x)``; no k-hat.)
* ``khat``: the Pareto shape of the weights' upper tail (PSIS, Vehtari et al. 2024), fitted
  with ArviZ's generalized-Pareto fit on the same tail ArviZ's ``psislw`` uses; k > 0.7
  means the estimate is unreliable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from inference.config import EvalConfig
from inference.logweights import compute_log_weights, draw_globals, global_sites
from models.base import DGMError, GenerativeModel
from models.registry import Registry

ESTIMATORS = Registry("estimator")
"""Estimator name -> its class, built from an ``EvalConfig``."""

FIELDS = (
    "K",
    "nll",
    "nll_stderr",
    "mc_stderr_mean",
    "ess_mean",
    "elbo",
    "khat_mean",
    "khat_frac_above_0.7",
    "accept_mean",
)
"""The summary fields an estimator may report (``Estimator.reports`` picks its own)."""


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
    settings: Optional[Dict[str, object]] = None  # the estimator's settings, as summaries name them
    accept: Optional[Tensor] = None  # MCMC estimators (ais): mean acceptance rate per datapoint

    def summary(self, reports: Optional[Tuple[str, ...]] = None) -> dict:
        """The dataset summary; fields outside ``reports`` (what the estimator declares
        meaningful; ``None``: all) are ``None``, i.e. "not available"."""
        n = self.log_px.numel()
        khat = self.khat[torch.isfinite(self.khat)]
        out = {
            "estimator": self.method,
            "settings": dict(self.settings or {}),
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
            "accept_mean": float(self.accept.mean()) if self.accept is not None else float("nan"),
        }
        if reports is not None:
            out.update({key: None for key in FIELDS if key not in reports})
        return out

    @staticmethod
    def cat(parts: list) -> "Estimate":
        first = parts[0]
        return Estimate(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("log_px", "stderr", "ess", "khat", "elbo")),
            method=first.method,
            num_samples=first.num_samples,
            settings=first.settings,
            accept=None if any(p.accept is None for p in parts) else torch.cat([p.accept for p in parts]),
        )


def tail_size(k: int) -> int:
    """Number of largest log-weights kept: ArviZ's PSIS tail length plus its cutoff."""
    return int(math.ceil(min(k / 5.0, 3 * math.sqrt(k)))) + 1


def gpd_shape(x: np.ndarray) -> float:
    """Shape ``k`` of a generalized Pareto distribution fitted to the sorted exceedances ``x``:
    Zhang and Stephens' (2009) empirical-Bayes estimate (a posterior mean of ``theta = -k /
    sigma`` over a grid of ``30 + sqrt(n)`` values, each weighted by its profile likelihood),
    then shrunk toward 0.5 with the weight of 10 observations, as PSIS does (Vehtari et al.
    2024). Tested equal to ArviZ's ``psislw`` k-hat."""
    n = len(x)
    m = 30 + int(math.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))) / (3.0 * quartile)
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    profile = n * (np.log(-theta / k) - k - 1.0)  # log-likelihood of (k(theta), theta)
    weights = np.exp(profile - profile.max())
    theta_hat = float((weights * theta).sum() / weights.sum())
    k_hat = float(np.log1p(-theta_hat * x).mean())
    return (n * k_hat + 10 * 0.5) / (n + 10)


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
                out[b] = gpd_shape(np.exp(t) - np.exp(cutoff))
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
    fixed_globals: Optional[Dict[str, Tensor]] = None,
) -> Estimate:
    """IS estimate of log p(x) for one batch ``x``; ``guide=None`` is the naive estimator.

    Samples are drawn ``chunk_size`` at a time (default: ``max_rows // B``). ``conditions``
    (e.g. ``{"y": labels}``, one row per row of ``x``) go to model and guide as keywords.
    A model with global latent sites is refused unless ``fixed_globals`` holds their values
    (the estimate is then of ``log p(x | theta)``, as :func:`nested` uses it).
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
            weights = compute_log_weights(
                model,
                guide,
                (x,),
                kwargs,
                num_particles=k,
                max_plate_nesting=max_plate_nesting,
                fixed_globals=fixed_globals,
            )
            if weights.has_globals and not fixed_globals:
                weights.refuse_globals("the is and naive estimators", "--estimator nested")
            lw = weights.log_w.double()
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


def nested(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    num_samples: int,
    global_samples: int,
    idx: Optional[Tensor] = None,
    size: Optional[int] = None,
    max_plate_nesting: int = 1,
    max_rows: int = 1 << 15,
    conditions: Optional[Dict[str, Tensor]] = None,
) -> Estimate:
    """Nested estimate of the log predictive density of each row of ``x`` (module
    docstring): ``global_samples`` draws of the global sites from ``guide`` (the prior
    where it does not sample them), ``num_samples`` local samples per datapoint for each.

    Draws are vectorized ``G`` at a time (``G * K * B <= max_rows``: one particle plate of
    ``G K`` particles, each global draw shared by ``K`` of them); where ``K * B`` alone is
    larger, each global draw is held fixed over chunks of local samples."""
    if num_samples < 1 or global_samples < 1:
        raise DGMError(f"the nested estimator needs K >= 1 and S >= 1, got K={num_samples}, S={global_samples}")
    b, k = x.shape[0], num_samples
    kwargs = {"idx": idx, "size": size} if idx is not None else {}
    kwargs.update(conditions or {})
    per_draw = []  # [G, B] blocks of log p_hat_s(x_b)
    local_elbo = torch.zeros(b, dtype=torch.float64, device=x.device)
    done = 0
    with torch.no_grad():
        while done < global_samples:
            g = min(global_samples - done, max(1, max_rows // max(k * b, 1)))
            if g * k * b <= max_rows:
                lw = compute_log_weights(
                    model,
                    guide,
                    (x,),
                    kwargs,
                    num_particles=g * k,
                    max_plate_nesting=max_plate_nesting,
                    global_draws=g,
                ).log_w.double()
                lw = lw.reshape(g, k, b)
                per_draw.append(torch.logsumexp(lw, dim=1) - math.log(k))
                local_elbo = local_elbo + lw.mean(1).sum(0)
            else:
                g = 1
                fixed = draw_globals(model, guide, (x,), kwargs, max_plate_nesting=max_plate_nesting)
                est = importance(
                    model,
                    guide,
                    x,
                    num_samples=k,
                    idx=idx,
                    size=size,
                    max_plate_nesting=max_plate_nesting,
                    max_rows=max_rows,
                    khat=False,
                    conditions=conditions,
                    fixed_globals=fixed,
                )
                per_draw.append(est.log_px.to(x.device, torch.float64).unsqueeze(0))
                local_elbo = local_elbo + est.elbo.to(x.device, torch.float64)
            done += g
    log_p = torch.cat(per_draw)  # [S, B]
    if torch.isnan(log_p).any():
        raise DGMError("log-weights are NaN: the model or guide produced invalid densities")
    log_px = torch.logsumexp(log_p, dim=0) - math.log(global_samples)
    w = (log_p - log_p.max(0).values).exp()
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    stderr = (1.0 / ess - 1.0 / global_samples).clamp_min(0).sqrt()
    nan = torch.full_like(log_px, float("nan"))
    elbo = local_elbo / global_samples
    return Estimate(log_px.cpu(), stderr.cpu(), ess.cpu(), nan.cpu(), elbo.cpu(), "nested", num_samples)


def model_global_sites(model: GenerativeModel) -> Tuple[str, ...]:
    """The latent sites of ``model`` outside the data plate, found by tracing its program
    once on two placeholder datapoints (no gradients, the caller's random stream kept)."""
    import pyro.poutine as poutine

    from models.base import collect_aux_terms

    x = model.data_spec.placeholder(2).to(device=model.device, dtype=model.dtype)
    kwargs = {"y": torch.zeros(2, dtype=torch.int64, device=x.device)} if model.uses_labels else {}
    devices = [model.device] if model.device.type == "cuda" else []
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=devices), collect_aux_terms(train=False):
        trace = poutine.trace(model.model).get_trace(x, torch.arange(2, device=x.device), 2, **kwargs)
    return global_sites(trace)


def exact(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> Estimate:
    with torch.no_grad():
        lp = log_prob(x).double().cpu()
    zeros = torch.zeros_like(lp)
    nan = torch.full_like(lp, float("nan"))
    return Estimate(lp, zeros, torch.full_like(lp, float("inf")), nan, nan, "exact", 0)


class Estimator:
    """Base class: ``estimate`` one batch. ``settings`` names the ``EvalConfig`` fields the
    estimator uses (shown in summaries as ``{"K": k}`` etc.); ``uses_guide`` says whether it
    proposes from a guide (and so whether guide diagnostics such as active units apply);
    ``reports`` names the summary fields (of ``FIELDS``) that mean something for it, and
    ``trust`` those of them that say how far to trust its number (summaries list them)."""

    name: ClassVar[str] = ""
    settings: ClassVar[Tuple[str, ...]] = ()
    uses_guide: ClassVar[bool] = False
    reports: ClassVar[Tuple[str, ...]] = ("nll", "nll_stderr")
    trust: ClassVar[Tuple[str, ...]] = ()  # the reported fields that say how far to trust the number
    progress: bool = True  # progress bars of long estimates; estimate_dataset sets it

    def __init__(self, config: EvalConfig):
        self.config = config

    def check(self, model: GenerativeModel) -> None:
        """Refuse ``model`` with a one-line error if this estimator cannot serve it."""

    def describe_settings(self) -> Dict[str, object]:
        return {"K" if name == "k" else name: getattr(self.config, name) for name in self.settings}

    def estimate(
        self, model: GenerativeModel, x: Tensor, *, guide=None, idx=None, size=None, conditions=None
    ) -> Estimate:
        raise NotImplementedError


@ESTIMATORS.register("exact", "the model's own exact log p(x) (autoregressive models, flows, PPCA, mixtures)")
class Exact(Estimator):
    name = "exact"

    def check(self, model: GenerativeModel) -> None:
        if not model.has_exact_log_prob:
            raise DGMError(f"{type(model).__name__} has no exact log p(x); use --estimator is (or naive)")

    def estimate(self, model, x, *, guide=None, idx=None, size=None, conditions=None) -> Estimate:
        return exact(functools.partial(model.log_prob, **conditions) if conditions else model.log_prob, x)


class _Sampling(Estimator):
    settings = ("k",)
    reports = ("K", "nll", "nll_stderr", "mc_stderr_mean", "ess_mean", "khat_mean", "khat_frac_above_0.7")

    def estimate(self, model, x, *, guide=None, idx=None, size=None, conditions=None) -> Estimate:
        est = importance(
            model.model,
            (guide or model.guide) if self.uses_guide else None,
            x,
            num_samples=self.config.k,
            idx=idx,
            size=size,
            max_plate_nesting=model.max_plate_nesting,
            conditions=conditions,
        )
        est.settings = self.describe_settings()
        return est


@ESTIMATORS.register("naive", "naive Monte Carlo: log mean p(x | z_k) over K prior samples")
class Naive(_Sampling):
    name = "naive"


@ESTIMATORS.register("is", "importance sampling with the guide as proposal, K samples (the IWAE_K bound)")
class ImportanceSampling(_Sampling):
    """Its mean log-weight is the guide's ELBO, reported as ``elbo``; the naive estimator's
    (the mean log-likelihood under prior samples) is no ELBO and is not reported."""

    name = "is"
    uses_guide = True
    reports = _Sampling.reports + ("elbo",)
    trust = ("khat_frac_above_0.7",)


@ESTIMATORS.register(
    "nested",
    "models with global latents: log p(x | data) with S global draws from the guide, IS over K local samples each",
)
class Nested(Estimator):
    """The log predictive density with the globals drawn from their guide (module
    docstring, :func:`nested`); ``stderr``/``ess`` are over the S global draws; ``elbo`` is
    the mean local log-weight (the local ELBO given the globals, averaged over the draws)."""

    name = "nested"
    settings = ("k", "global_samples")
    uses_guide = True
    reports = ("K", "nll", "nll_stderr", "mc_stderr_mean", "ess_mean", "elbo")

    def estimate(self, model, x, *, guide=None, idx=None, size=None, conditions=None) -> Estimate:
        est = nested(
            model.model,
            guide or model.guide,
            x,
            num_samples=self.config.k,
            global_samples=self.config.global_samples,
            idx=idx,
            size=size,
            max_plate_nesting=model.max_plate_nesting,
            conditions=conditions,
        )
        est.settings = self.describe_settings()
        return est


def default_estimator(model: GenerativeModel) -> str:
    """``auto``: exact where the model has it, else ``nested`` for a model with global
    latent sites, else importance sampling."""
    if model.has_exact_log_prob:
        return "exact"
    return "nested" if model_global_sites(model) else "is"


def make_estimator(config: EvalConfig, model: GenerativeModel) -> Estimator:
    """The estimator ``config`` names (``auto`` resolved for ``model``), checked against it."""
    config.check()
    name = default_estimator(model) if config.estimator == "auto" else config.estimator
    estimator = ESTIMATORS.get(name).factory(config)
    estimator.check(model)
    return estimator


def estimate_dataset(
    model,
    data: Tensor,
    *,
    method: str = "auto",
    num_samples: int = 1000,
    guide: Optional[Callable] = None,
    batch_size: int = 100,
    progress: bool = True,
    conditions: Optional[Dict[str, Tensor]] = None,
    estimator: Optional[Estimator] = None,
) -> Estimate:
    """Estimate log p(x) for every row of ``data`` with ``method`` (a name in
    ``ESTIMATORS``, or ``auto``) and ``num_samples`` (K), or with a ready ``estimator``.

    ``model`` is a ``GenerativeModel``; ``guide`` defaults to its amortized guide. The
    guide is called with dataset indices ``idx`` so per-datapoint guides fitted on
    ``data`` work unchanged. ``conditions`` (e.g. ``{"y": labels}`` for a model with
    ``uses_labels``) are tensors with one row per row of ``data``, sliced like it and passed
    to model and guide (and to ``log_prob`` for ``exact``) as keyword arguments.
    """
    if estimator is None:
        estimator = make_estimator(EvalConfig(estimator=method, k=num_samples, batch_size=batch_size), model)
    model.check_data(data, "data to estimate log p(x) of")
    n = data.shape[0]
    conditions = conditions or {}
    for key, value in conditions.items():
        if value.shape[:1] != (n,):
            raise DGMError(f"condition {key!r} has {list(value.shape)[:1]} rows, the data {n}; give one per datapoint")
    estimator.progress = progress
    parts = []
    bar = tqdm(total=n, desc=f"log p(x) [{estimator.name}]", disable=not progress, leave=False, mininterval=2.0)
    for start in range(0, n, batch_size):
        x = data[start : start + batch_size]
        cond = {key: value[start : start + batch_size] for key, value in conditions.items()}
        idx = torch.arange(start, start + x.shape[0], device=x.device)
        parts.append(estimator.estimate(model, x, guide=guide, idx=idx, size=n, conditions=cond))
        bar.update(x.shape[0])
    bar.close()
    return Estimate.cat(parts)

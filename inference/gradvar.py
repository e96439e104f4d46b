"""Gradient variance and signal-to-noise ratio of an objective at fixed parameters.

At fixed model and guide parameters, ``M`` independent estimates ``g_1 .. g_M`` of the
gradient of the objective's loss per datapoint (the training loss divided by the data size
``N``) on one minibatch, each from fresh samples. Per parameter ``j`` of a group::

    mean_j = (1/M) sum_m g_mj,   var_j = (1/(M-1)) sum_m (g_mj - mean_j)^2,   SNR_j = |mean_j| / sqrt(var_j)

and per group (Rainforth et al. 2018, "Tighter variational bounds are not necessarily
better", Sec. 3 and their figures): ``snr`` is the **mean over the group's parameters of the
per-parameter SNR** (parameters whose estimates do not vary, e.g. unused ones, are left out),
``snr_median`` its median, ``variance`` the mean per-parameter variance (trace of the
covariance over the number of parameters), ``mean_sq`` the mean squared mean gradient.

Groups: ``encoder`` = the guide's parameters (the guide's own and the model parameters its
program depends on, found by differentiating the guide's log-densities); ``decoder`` = the
rest of the model's parameters. Objectives' auxiliary parameters (baselines) are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from tqdm.auto import tqdm

from models.base import DGMError, GenerativeModel

__all__ = ["GroupStats", "parameter_groups", "gradient_estimates", "gradient_stats", "plot_snr"]


@dataclass
class GroupStats:
    """One parameter group's gradient statistics over ``n_estimates`` estimates."""

    group: str
    parameters: int
    n_estimates: int
    snr: float
    snr_median: float
    variance: float
    mean_sq: float
    per_parameter_snr: Optional[Tensor] = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_parameter_snr"}


def parameter_groups(
    model: GenerativeModel, guide: nn.Module, x: Tensor, **conditions
) -> Dict[str, List[nn.Parameter]]:
    """``{"encoder": [...], "decoder": [...]}``: the guide's own parameters and the model
    parameters the guide program's log-densities depend on; the rest of the model's."""
    n = x.shape[0]
    model_params = [p for p in model.parameters() if p.requires_grad]
    own = [p for p in guide.parameters() if p.requires_grad]
    with poutine.block(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(guide).get_trace(x, torch.arange(n, device=x.device), n, **conditions)
    total = sum(
        site["fn"].log_prob(site["value"].detach()).sum()
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    )
    used = set()
    if isinstance(total, Tensor) and total.requires_grad and model_params:
        grads = torch.autograd.grad(total, model_params, allow_unused=True)
        used = {id(p) for p, g in zip(model_params, grads) if g is not None}
    own_ids = {id(p) for p in own}
    encoder = own + [p for p in model_params if id(p) in used and id(p) not in own_ids]
    decoder = [p for p in model_params if id(p) not in used]
    return {"encoder": encoder, "decoder": decoder}


def gradient_estimates(
    objective,
    model: GenerativeModel,
    guide: nn.Module,
    x: Tensor,
    groups: Dict[str, List[nn.Parameter]],
    n_estimates: int,
    *,
    idx: Optional[Tensor] = None,
    size: Optional[int] = None,
    conditions: Optional[Dict[str, Tensor]] = None,
    progress: bool = False,
) -> Dict[str, Tensor]:
    """``{group: [M, P]}``: ``n_estimates`` independent gradient estimates of the
    objective's loss per datapoint (``loss / size``) with respect to each group's parameters,
    flattened; no parameter or objective state changes. ``progress`` shows a bar."""
    if n_estimates < 2:
        raise DGMError(f"--n-estimates must be >= 2 (a variance needs two estimates), got {n_estimates}")
    size = size or x.shape[0]
    idx = idx if idx is not None else torch.arange(x.shape[0], device=x.device)
    conditions = conditions or {}
    names = [g for g in groups if groups[g]]
    params = [p for g in names for p in groups[g]]
    out: Dict[str, List[Tensor]] = {g: [] for g in names}
    bar = tqdm(range(n_estimates), desc="gradient estimates", disable=not progress, leave=False, mininterval=2.0)
    for _ in bar:
        try:
            loss, _ = objective.loss_terms(model.model, guide, x, idx, size, train=False, **conditions)
        except NotImplementedError:
            raise DGMError(f"{type(objective).__name__} has no gradient estimator to measure") from None
        grads = torch.autograd.grad(loss / size, params, allow_unused=True)
        it = iter(zip(params, grads))
        for g in names:
            flat = [(d if d is not None else torch.zeros_like(p)).reshape(-1) for p, d in (next(it) for _ in groups[g])]
            out[g].append(torch.cat(flat).detach().double())
    return {g: torch.stack(v) for g, v in out.items()}


def gradient_stats(estimates: Dict[str, Tensor]) -> Dict[str, GroupStats]:
    """Per-group statistics of ``[M, P]`` estimates (see the module docstring)."""
    stats = {}
    for group, g in estimates.items():
        m = g.shape[0]
        mean, var = g.mean(0), g.var(0, unbiased=True)
        varies = var > 0
        snr = mean.abs()[varies] / var[varies].sqrt()
        stats[group] = GroupStats(
            group=group,
            parameters=int(g.shape[1]),
            n_estimates=m,
            snr=float(snr.mean()) if snr.numel() else math.nan,
            snr_median=float(snr.median()) if snr.numel() else math.nan,
            variance=float(var.mean()),
            mean_sq=float(mean.pow(2).mean()),
            per_parameter_snr=snr,
        )
    return stats


def plot_snr(stats: Dict[str, GroupStats], path, title: str = "") -> None:
    """A PNG of each group's per-parameter SNR (histogram of log10 SNR), means marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in stats.values():
        values = s.per_parameter_snr
        if values is None or not values.numel():
            continue
        logs = values.clamp_min(1e-12).log10().numpy()
        ax.hist(logs, bins=50, alpha=0.5, label=f"{s.group} ({s.parameters} params): mean SNR {s.snr:.3g}")
        ax.axvline(math.log10(max(s.snr, 1e-12)), linestyle="--", color="k", linewidth=0.8)
    ax.set_xlabel("log10 SNR = |mean| / std per parameter")
    ax.set_ylabel("parameters")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

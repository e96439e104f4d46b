"""Diagnostics of fitted models and estimators.

* Importance-sampling ESS and PSIS k-hat live with the estimators (``inference.estimators``),
  which compute them in the same streaming pass as log p(x).
* ``active_units``: a latent unit u is active when ``Cov_x(E_q[u | x]) > 0.01``
  (Burda et al. 2016, section 5.2); posterior collapse shows as few active units. With
  several latent sites (stochastic layers) it counts them per site, as the paper's table 2
  does per layer. Sites outside the data plate (global latents) have no units per
  datapoint and are not counted.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from models.base import DATA_PLATE

ACTIVE_THRESHOLD = 1e-2


@torch.no_grad()
def posterior_means(
    guide: Callable,
    x: Tensor,
    batch_size: int = 500,
    num_samples: int = 64,
    num_draws: int = 1,
    conditions: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Tensor]:
    """``E_q[z | x]`` per latent site, ``[N, units]``: the guide's analytic mean where it has
    one, else a Monte Carlo average of ``num_samples`` draws. ``conditions`` (e.g.
    ``{"y": labels}``, one row per row of ``x``) go to the guide as keywords, sliced like ``x``.

    In a guide with several sites a later site's ``q`` may depend on the earlier sites'
    samples (``q(h2 | h1)``); its mean ``E_q(h1|x)[E_q(h2|h1)[h2]]`` is then averaged over
    ``num_draws`` traces of the guide (one trace suffices for a single site)."""
    n = x.shape[0]
    chunks: Dict[str, list] = {}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size), device=x.device)
        draws = []
        for _ in range(num_draws):
            cond = {key: value[idx] for key, value in (conditions or {}).items()}
            draws.append(_site_means(guide, x[idx], idx, n, num_samples, cond))
            if len(draws[0]) <= 1:
                break
        for name in draws[0]:
            mean = draws[0][name] if len(draws) == 1 else torch.stack([d[name] for d in draws]).mean(0)
            chunks.setdefault(name, []).append(mean.reshape(len(idx), -1))
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def _site_means(guide: Callable, x: Tensor, idx: Tensor, n: int, num_samples: int, cond: dict) -> Dict[str, Tensor]:
    trace = prune_subsample_sites(poutine.trace(guide).get_trace(x, idx, n, **cond))
    means = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if not any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
            continue  # a global site (decoder weights): no datapoint whose unit it is
        fn = site["fn"]
        try:
            means[name] = fn.mean
        except NotImplementedError:
            means[name] = torch.stack([fn.sample() for _ in range(num_samples)]).float().mean(0)
    return means


def active_units_per_site(
    guide: Callable,
    x: Tensor,
    threshold: float = ACTIVE_THRESHOLD,
    num_draws: int = 16,
    conditions: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, int]:
    means = posterior_means(guide, x, num_draws=num_draws, conditions=conditions)
    return {name: int((m.double().var(0) > threshold).sum()) for name, m in means.items()}


def active_units(
    model,
    guide: Callable,
    x: Tensor,
    threshold: float = ACTIVE_THRESHOLD,
    conditions: Optional[Dict[str, Tensor]] = None,
) -> Union[int, Dict[str, int]]:
    """Active latent units of ``guide`` on data ``x``: their number for a guide with one
    latent site; for several, ``{site: count, ..., "total": sum}`` (units per layer).
    ``conditions``: keyword tensors for the guide (``{"y": labels}``), one row per datapoint."""
    per_site = active_units_per_site(guide, x, threshold, conditions=conditions)
    total = sum(per_site.values())
    return total if len(per_site) <= 1 else {**per_site, "total": total}

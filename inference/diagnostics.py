"""Diagnostics of fitted models and estimators.

* Importance-sampling ESS and PSIS k-hat live with the estimators (``inference.estimators``),
  which compute them in the same streaming pass as log p(x).
* ``active_units``: a latent unit u is active when ``Cov_x(E_q[u | x]) > 0.01``
  (Burda et al. 2016, section 5.2); posterior collapse shows as few active units.
"""

from __future__ import annotations

from typing import Callable, Dict

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

ACTIVE_THRESHOLD = 1e-2


@torch.no_grad()
def posterior_means(guide: Callable, x: Tensor, batch_size: int = 500, num_samples: int = 64) -> Dict[str, Tensor]:
    """``E_q[z | x]`` per latent site, ``[N, units]``: the guide's analytic mean where it has
    one, else a Monte Carlo average of ``num_samples`` draws."""
    n = x.shape[0]
    chunks: Dict[str, list] = {}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size), device=x.device)
        trace = prune_subsample_sites(poutine.trace(guide).get_trace(x[idx], idx, n))
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            fn = site["fn"]
            try:
                mean = fn.mean
            except NotImplementedError:
                mean = torch.stack([fn.sample() for _ in range(num_samples)]).float().mean(0)
            chunks.setdefault(name, []).append(mean.reshape(len(idx), -1))
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def active_units_per_site(guide: Callable, x: Tensor, threshold: float = ACTIVE_THRESHOLD) -> Dict[str, int]:
    means = posterior_means(guide, x)
    return {name: int((m.double().var(0) > threshold).sum()) for name, m in means.items()}


def active_units(model, guide: Callable, x: Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Total number of active latent units of ``guide`` on data ``x``."""
    return sum(active_units_per_site(guide, x, threshold).values())

"""Bidirectional Monte Carlo (Grosse, Ghahramani and Adams 2015; Wu et al. 2017): how far
AIS's estimate of log p(x) can be off, measured on data simulated from the model itself.

1. Simulate: run the model's Pyro program generatively (``poutine.uncondition``: the
   observed site is sampled instead of observed) on a placeholder batch
   ``model.data_spec.placeholder(N)``, keeping every latent site's value. Each ``(x, z*)`` is
   a draw from ``p(x, z)``, so ``z*`` is an exact sample of the posterior ``p(z | x)`` of the
   ``x`` it generated.
2. Forward AIS (``inference.ais.ais``) on the simulated ``x``, prior -> posterior: a
   stochastic lower bound of log p(x) (``E[log p_hat] <= log p(x)``).
3. Reverse AIS (``ais(..., initial=z*, reverse=True)``), every chain started at ``z*`` and
   the same path walked posterior -> prior: each chain's ``exp(log_w)`` is unbiased for
   ``1 / p(x)``, so ``-log mean_c exp(log_w_c)`` is a stochastic upper bound.

Both use the same schedule, HMC kernel and step-size adaptation (``inference.ais``); the gap
``upper - lower`` bounds, in expectation, the error of the forward estimate with these
settings on data like the simulated, and shrinks to 0 as ``T`` grows. The gap is the
model's, measured where the truth is known; on real data (not drawn from the model) it is
a guide to the setting, not a bound.

Generic: nothing here knows a model. Refused, each with its reason: models without latent
sites or with a discrete one (AIS moves continuous latents), models with other than one
observed site of the data's shape, latent sites outside the ``"data"`` plate, and models
that read ``x`` beyond observing it (found by running the program on two placeholders with
the same random numbers: the draws must not change), since running such a program
generatively does not draw from it (an autoregressive decoder fed ``x`` is one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pyro.poutine as poutine
import torch
from torch import Tensor

from inference.ais import SCHEDULES, ais
from inference.logweights import _data_dim, _sample_sites
from models.base import DGMError, GenerativeModel


def _check_count(value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DGMError(f"{flag} must be an integer >= 1, got {value!r}")


def check_settings(n: int, steps: int, chains: int, leapfrog: int, schedule_name: str = "sigmoid") -> None:
    """Refuse a bad BDMC setting in one line (before any work)."""
    for value, flag in ((n, "--n"), (steps, "--steps"), (chains, "--chains"), (leapfrog, "--leapfrog")):
        _check_count(value, flag)
    if schedule_name not in SCHEDULES:
        raise DGMError(f"unknown AIS schedule {schedule_name!r}; choose from {', '.join(SCHEDULES)}")


# --- simulation ---------------------------------------------------------------------------------
@dataclass
class Simulation:
    """``N`` draws ``(x, z*) ~ p(x, z)`` of a model: ``x [N, *event_shape]`` and the latent
    sites' values as the model sampled them (``latents``), each with its datapoint dim at
    ``data_dims[name]`` (counted from the left)."""

    x: Tensor
    latents: Dict[str, Tensor]
    data_dims: Dict[str, int]
    observed: str  # the name of the observed site

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, start: int, stop: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``x`` and ``z*`` of datapoints ``start .. stop - 1``."""
        z = {name: v.narrow(self.data_dims[name], start, stop - start) for name, v in self.latents.items()}
        return self.x[start:stop], z


def _generative_trace(model: GenerativeModel, placeholder: Tensor):
    return poutine.trace(poutine.uncondition(model.model)).get_trace(placeholder)


def simulate(model: GenerativeModel, n: int) -> Simulation:
    """``n`` datapoints simulated by the model's own program, with the latent values that
    generated them; random numbers from the global torch RNG."""
    _check_count(n, "--n")
    what = type(model).__name__
    placeholder = model.data_spec.placeholder(n).to(device=model.device, dtype=model.dtype)
    devices = [placeholder.device] if placeholder.device.type == "cuda" else []
    with torch.no_grad():
        with torch.random.fork_rng(devices=devices):  # the same random numbers as the run below
            probe = _generative_trace(model, torch.ones_like(placeholder))
        trace = _generative_trace(model, placeholder)
    sites = list(_sample_sites(trace))
    observed = [name for name, site in sites if site["infer"].get("was_observed")]
    if len(observed) != 1:
        raise DGMError(f"BDMC simulates x from the model's one observed site, but {what} observes {observed or 'none'}")
    probe_sites = dict(_sample_sites(probe))
    for name, site in sites:
        other = probe_sites.get(name)
        if (
            other is None
            or other["value"].shape != site["value"].shape
            or not torch.equal(other["value"], site["value"])
        ):
            raise DGMError(
                f"{what} reads x beyond observing it (site {name!r} changes with x at the same random numbers), "
                "so running it generatively does not draw from it; BDMC needs a model that uses x only as the "
                "observation"
            )
    x = trace.nodes[observed[0]]["value"]
    if tuple(x.shape) != tuple(placeholder.shape):
        raise DGMError(
            f"BDMC simulates x from site {observed[0]!r}, whose value has shape {list(x.shape)}, not the data's "
            f"{list(placeholder.shape)}"
        )
    latents, data_dims = {}, {}
    for name, site in sites:
        if name == observed[0]:
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise DGMError(f"BDMC runs AIS, which moves continuous latents, but site {name!r} of {what} is discrete")
        dim = _data_dim(site)
        value = site["value"].detach()
        pos = None if dim is None else value.dim() - fn.event_dim + dim
        if pos is None or pos < 0 or value.shape[pos] != n:
            raise DGMError(
                f"site {name!r} of {what} is not one value per datapoint in the 'data' plate; BDMC needs that"
            )
        latents[name], data_dims[name] = value, pos
    if not latents:
        raise DGMError(f"{what} has no latent sites: its log p(x) needs no AIS, and BDMC has nothing to check")
    return Simulation(x.detach(), latents, data_dims, observed[0])


# --- forward and reverse AIS --------------------------------------------------------------------
@dataclass
class BDMCResult:
    """Per simulated datapoint (float64 ``[N]``): the forward AIS estimate ``lower``, the
    reverse AIS estimate ``upper``, their standard errors across chains and the chains' mean
    acceptance rates."""

    lower: Tensor
    upper: Tensor
    lower_stderr: Tensor
    upper_stderr: Tensor
    accept_forward: Tensor
    accept_reverse: Tensor
    settings: dict = field(default_factory=dict)

    @property
    def gap(self) -> Tensor:
        """``upper - lower`` per datapoint (nats): >= 0 in expectation."""
        return self.upper - self.lower

    @property
    def n(self) -> int:
        return int(self.lower.shape[0])

    def summary(self) -> dict:
        """Means over the datapoints (nats) and the standard error of the mean gap across them."""
        gap = self.gap
        spread = float(gap.std() / math.sqrt(self.n)) if self.n > 1 else float("nan")
        return {
            **self.settings,
            "n": self.n,
            "lower": float(self.lower.mean()),
            "upper": float(self.upper.mean()),
            "gap": float(gap.mean()),
            "gap_stderr": spread,
        }

    def to_json(self) -> dict:
        per = {
            "lower": self.lower,
            "upper": self.upper,
            "gap": self.gap,
            "lower_stderr": self.lower_stderr,
            "upper_stderr": self.upper_stderr,
            "accept_forward": self.accept_forward,
            "accept_reverse": self.accept_reverse,
        }
        return {**self.summary(), "per_datapoint": {key: value.tolist() for key, value in per.items()}}


def bdmc(
    model: GenerativeModel,
    n: Optional[int] = None,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    schedule_name: str = "sigmoid",
    batch_size: Optional[int] = None,
    simulation: Optional[Simulation] = None,
    progress: bool = False,
) -> BDMCResult:
    """Simulate ``n`` datapoints from ``model`` (or take ``simulation``) and sandwich each
    log p(x) between forward AIS from the prior and reverse AIS from the exact ``z*``: ``T =
    steps``, ``C = chains``, ``L = leapfrog``, ``batch_size`` datapoints at a time (default
    all). Random numbers from the global torch RNG: seed it for a reproducible result."""
    n = len(simulation) if simulation is not None else n
    check_settings(n, steps, chains, leapfrog, schedule_name)
    if batch_size is not None:
        _check_count(batch_size, "the BDMC batch size")
    sim = simulation if simulation is not None else simulate(model, n)
    common = dict(
        steps=steps,
        chains=chains,
        leapfrog=leapfrog,
        schedule_name=schedule_name,
        max_plate_nesting=model.max_plate_nesting,
        progress=progress,
        what=type(model).__name__,
        has_exact_log_prob=model.has_exact_log_prob,
    )
    forward, backward = [], []
    size = batch_size or n
    for start in range(0, n, size):
        x, z = sim.rows(start, min(n, start + size))
        forward.append(ais(model.model, None, x, **common))
        backward.append(ais(model.model, None, x, initial=z, reverse=True, **common))

    def cat(parts, key):
        return torch.cat([getattr(p, key) for p in parts]).double()

    return BDMCResult(
        lower=cat(forward, "log_px"),
        upper=cat(backward, "log_px"),
        lower_stderr=cat(forward, "stderr"),
        upper_stderr=cat(backward, "stderr"),
        accept_forward=cat(forward, "accept"),
        accept_reverse=cat(backward, "accept"),
        settings={"steps": steps, "chains": chains, "leapfrog": leapfrog, "schedule": schedule_name},
    )

"""The one log-weight core every objective and estimator reduces.

Trace the guide once under a particle plate of size K (so K samples are drawn in one
vectorized pass), replay the model against it, and return per-datapoint terms of shape
``[K, B]``::

    log_w[k, b] = log p(x_b, z_kb) - log q(z_kb | x_b)

together with its parts (observed log-likelihood, log prior and log guide density of the
latent sites) and ``log_q_sf``, the guide log-density of every site whose gradient needs a
score-function term (non-reparameterizable sites, or all sites when the caller forces it).

Per-datapoint attribution uses the ``"data"`` plate of the model contract: every site's
log-density is summed over all batch dimensions except the particle dimension and the data
plate's dimension. Minibatch scaling (``N / B``) is returned separately as ``scale`` so
that per-datapoint bounds (IWAE) are computed before scaling, which is where Pyro's
``RenyiELBO`` goes wrong for local latents under subsampled plates (pyro issues 2220, 3104).

Model latent sites the guide does not sample are proposed from the prior, so their prior
log-density cancels and does not enter ``log_w``. With ``guide=None`` every latent site is
proposed from the prior: ``log_w`` is the log-likelihood (the naive Monte Carlo estimator).
Auxiliary guide sites (``infer={"is_auxiliary": True}``: Pyro's autoguides draw an
unconstrained value there and emit the model's site as a ``Delta`` carrying the Jacobian)
enter ``log q`` only, as in Pyro's ELBOs.

Global sites. A site outside the data plate (a shared scale, Bayesian decoder weights) has
no datapoint to be attributed to: its ``log p - log q`` (its ``log p`` for an observed
one), summed over everything but the particle dim, goes to ``global_log_ratio`` ``[K]``,
never into ``log_w``; ``log_w`` stays the local, per-datapoint part given the particle's
globals. A training objective's minibatch total is then, as in Pyro's ``Trace_ELBO``,
``(N / B) sum_b [local term]_b + [global term]``: each global term counted once per step.
By default each particle draws its own globals (Pyro's vectorized particles);
``global_draws=G`` draws only ``G`` of them, each shared by ``K / G`` consecutive particles
(``G = 1``: one draw shared by all, what the multi-sample bounds need), and
``fixed_globals`` supplies the values of the global sites instead of drawing them (the
nested estimator, which holds one draw over several chunks of local samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import kl_divergence

from models.base import DATA_PLATE, DGMError, IndexedPlate

PARTICLE_PLATE = "particles"


@dataclass
class LogWeights:
    """Per-particle, per-datapoint terms, each ``[K, B]`` (``kl`` is ``None`` unless asked)."""

    log_w: Tensor
    log_lik: Tensor
    log_prior: Tensor
    log_q: Tensor
    log_q_sf: Tensor
    has_sf: bool
    scale: float
    kl: Optional[Tensor] = None  # sum of analytic KL(q || p) over sites that have one
    kl_free_log_ratio: Optional[Tensor] = None  # log p(z) - log q(z) of the other sites
    # sites outside the data plate (None / () when the model has none): log p - log q of
    # the global latent sites plus log p of global observed ones, [K]; the guide density
    # of the global sites that need a score-function term, [K] (None without any)
    global_log_ratio: Optional[Tensor] = None
    global_log_q_sf: Optional[Tensor] = None
    global_sites: Tuple[str, ...] = ()

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]

    @property
    def has_globals(self) -> bool:
        return bool(self.global_sites)

    def refuse_globals(self, what: str, instead: str = "elbo or iwae") -> None:
        """One-line refusal for a reduction that has no meaning with global sites."""
        if self.global_sites:
            raise DGMError(
                f"{what} does not support latent sites outside the {DATA_PLATE!r} plate "
                f"({', '.join(self.global_sites)}); use {instead}"
            )


def _particle_plate(size: int, dim: int) -> IndexedPlate:
    """``pyro.plate(PARTICLE_PLATE, size, dim=dim)`` without the subsample site (see
    ``IndexedPlate``): the sites see the same frame, broadcast and random draws."""
    return IndexedPlate(PARTICLE_PLATE, size, dim)


class _DetachSamples(Messenger):
    """Draw guide samples detached, so their gradient flows only through score-function
    terms. Sampling happens here, in the process phase after the plates have broadcast the
    distribution, so the trace records (and the model replays) the detached value."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"]).detach()
            msg["done"] = True


class _ShareGlobals(Messenger):
    """Draw each latent site outside the data plate ``draws`` times instead of once per
    particle, each draw shared by ``num_particles / draws`` consecutive particles, or set
    it to ``fixed[name]``. Placed inside the particle plate, so it runs before the plate
    broadcasts the distribution (the draw has ``draws`` rows, not K); sites in ``skip``
    (replayed from the guide) are left alone."""

    def __init__(self, draws, num_particles, particle_dim, fixed=None, detach=False, skip=()):
        super().__init__()
        self.draws, self.num_particles, self.particle_dim = draws, num_particles, particle_dim
        self.fixed, self.detach, self.skip = fixed or {}, detach, set(skip)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None or msg["name"] in self.skip:
            return
        if site_is_subsample(msg) or any(f.name == DATA_PLATE for f in msg["cond_indep_stack"]):
            return
        if msg["name"] in self.fixed:
            msg["value"], msg["done"] = self.fixed[msg["name"]], True
            return
        if self.draws is None:
            return
        fn, n = msg["fn"], -self.particle_dim
        batch = tuple(fn.batch_shape)
        every = 1  # keep every `every`-th particle's draw
        if len(batch) < n:
            fn = fn.expand((self.draws,) + (1,) * (n - 1 - len(batch)) + batch)
        elif len(batch) == n and batch[0] in (1, self.draws):  # depends on shared draws already (a Delta)
            fn = fn.expand((self.draws,) + batch[1:])
        elif len(batch) == n and batch[0] == self.num_particles:
            every = self.num_particles // self.draws
        else:
            raise DGMError(
                f"site {msg['name']!r} has {len(batch)} batch dims but the particle plate sits at "
                f"dim {self.particle_dim}; raise the model's max_plate_nesting"
            )
        value = fn.rsample() if fn.has_rsample else fn.sample()
        if every > 1:
            value = value[::every]
        if self.detach:
            value = value.detach()
        if 1 < self.draws < self.num_particles:
            value = value.repeat_interleave(self.num_particles // self.draws, dim=0)
        msg["value"], msg["done"] = value, True


def _batch_dims(site, log_p: Tensor, particle_dim: int) -> int:
    """The batch dims a site may have (``-particle_dim``); more is refused by name."""
    n = -particle_dim
    if log_p.dim() > n:
        raise DGMError(
            f"site {site['name']!r} has {log_p.dim()} batch dims but the particle plate sits at "
            f"dim {particle_dim}; raise the model's max_plate_nesting"
        )
    return n


def _global_term(site, log_p: Tensor, particle_dim: int, num_particles: int) -> Tensor:
    """Sum a global site's log-density over every batch dim but the particles: ``[K]``."""
    n = _batch_dims(site, log_p, particle_dim)
    mask = site["mask"]
    if mask is not None and mask is not True:
        log_p = torch.where(mask, log_p, 0.0) if isinstance(mask, Tensor) else log_p * 0.0
    scale = site["scale"]
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        log_p = log_p * scale  # a subsampled plate other than the data plate
    log_p = log_p.reshape((1,) * (n - log_p.dim()) + tuple(log_p.shape))
    return log_p.reshape(log_p.shape[0], -1).sum(-1).expand(num_particles)


def _per_datapoint(site, log_p: Tensor, particle_dim: int, shape: tuple) -> Tensor:
    """Sum a site's log-density over every batch dim except particles and data: ``[K, B]``."""
    n = _batch_dims(site, log_p, particle_dim)
    mask = site["mask"]
    if log_p.shape == shape and n == 2 and mask is None and _data_dim(site) == -1:
        return log_p  # already [K, B]: the common case, no views to build or backpropagate
    if mask is not None and mask is not True:
        log_p = torch.where(mask, log_p, 0.0) if isinstance(mask, Tensor) else log_p * 0.0
    log_p = log_p.reshape((1,) * (n - log_p.dim()) + tuple(log_p.shape))
    data_dim = _data_dim(site)
    if data_dim is None:
        raise DGMError(
            f"site {site['name']!r} is outside the {DATA_PLATE!r} plate; per-datapoint "
            "log-weights need every latent and observed site inside model.data_plate(...)"
        )
    keep = {0, n + data_dim}
    other = [d for d in range(n) if d not in keep]
    if other:
        log_p = log_p.sum(dim=other, keepdim=True)
    return log_p.reshape(log_p.shape[0], log_p.shape[n + data_dim]).expand(shape)


def _sample_sites(trace):
    """``(name, site)`` of the sample sites, without Pyro's subsample bookkeeping sites
    (filtered in place: ``prune_subsample_sites`` copies the trace)."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _data_dim(site) -> Optional[int]:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    return None


def data_frame(trace):
    """The ``"data"`` plate's frame (its ``size`` is the batch, ``full_size`` the dataset)."""
    for _, site in _sample_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.name == DATA_PLATE:
                return frame
    raise DGMError(f"the model has no {DATA_PLATE!r} plate; wrap its sites in model.data_plate(...)")


def compute_log_weights(
    model: Callable,
    guide: Optional[Callable],
    args: tuple = (),
    kwargs: Optional[dict] = None,
    *,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    force_score_function: bool = False,
    analytic_kl: bool = False,
    global_draws: Optional[int] = None,
    fixed_globals: Optional[Dict[str, Tensor]] = None,
) -> LogWeights:
    """Draw ``num_particles`` samples from ``guide`` in one vectorized pass and score them.

    Args:
        model, guide: Pyro programs with the same signature; ``guide=None`` proposes from
            the prior.
        max_plate_nesting: plates the model nests (the data plate counts one); the particle
            plate goes one dim to the left of them.
        force_score_function: detach every guide sample, so guide gradients come only from
            score-function terms (the ``elbo-sf`` objective).
        analytic_kl: also return ``kl``, the closed-form KL(q || p) of latent sites whose
            guide and prior pair has one (and which are reparameterized), and
            ``kl_free_log_ratio`` for the rest; only valid for the mean over particles.
        global_draws: draws of the sites outside the data plate, each shared by
            ``num_particles / global_draws`` consecutive particles (``None``: one per
            particle, as Pyro's vectorized particles).
        fixed_globals: values of sites outside the data plate (``{name: [1, ...]}``, e.g.
            from :func:`draw_globals`), used by every particle instead of drawing them.
    """
    kwargs = kwargs or {}
    particle_dim = -(max_plate_nesting + 1)
    if global_draws is not None and (global_draws < 1 or num_particles % global_draws):
        raise DGMError(f"global_draws must divide the {num_particles} particles, got {global_draws}")
    share = global_draws is not None or bool(fixed_globals)
    if fixed_globals and global_draws is None:
        global_draws = 1  # global sites left unfixed (an autoguide's joint draw) matter no more: draw them once

    def particles(fn, skip=()):
        if share:
            fn = _ShareGlobals(global_draws, num_particles, particle_dim, fixed_globals, force_score_function, skip)(fn)
        return _particle_plate(num_particles, particle_dim)(fn)

    if guide is None:
        guide_trace = None
        model_trace = poutine.trace(particles(model)).get_trace(*args, **kwargs)
    else:
        guide_fn = particles(guide)
        if force_score_function:
            guide_fn = _DetachSamples()(guide_fn)
        guide_trace = poutine.trace(guide_fn).get_trace(*args, **kwargs)
        replayed = particles(model, skip=guide_trace.nodes)
        model_trace = poutine.trace(poutine.replay(replayed, trace=guide_trace)).get_trace(*args, **kwargs)
    frame = data_frame(model_trace)
    shape = (num_particles, frame.size)
    lik, prior, q, q_sf, kls, kl_free = [], [], [], [], [], []
    glob, glob_sf, glob_names = [], [], []
    has_sf = False

    guide_sites, aux_sites = {}, {}
    if guide_trace is not None:
        for name, site in _sample_sites(guide_trace):
            if not site["is_observed"]:
                (aux_sites if site["infer"].get("is_auxiliary") else guide_sites)[name] = site

    for name, site in _sample_sites(model_trace):
        if _data_dim(site) is None:  # a global site: counted once, beside the per-datapoint terms
            glob_names.append(name)
            if site["is_observed"]:
                glob.append(_global_term(site, site["fn"].log_prob(site["value"]), particle_dim, num_particles))
            elif name in guide_sites:
                g = guide_sites[name]
                lp = _global_term(site, site["fn"].log_prob(site["value"]), particle_dim, num_particles)
                lq = _global_term(g, g["fn"].log_prob(g["value"]), particle_dim, num_particles)
                glob.append(lp - lq)
                if force_score_function or not g["fn"].has_rsample:
                    has_sf = True
                    glob_sf.append(lq)
            continue
        if site["is_observed"]:
            lik.append(_per_datapoint(site, site["fn"].log_prob(site["value"]), particle_dim, shape))
            continue
        if name not in guide_sites:
            continue  # proposed from the prior: log p(z) - log q(z) = 0
        g = guide_sites[name]
        lp = _per_datapoint(site, site["fn"].log_prob(site["value"]), particle_dim, shape)
        lq = _per_datapoint(g, g["fn"].log_prob(g["value"]), particle_dim, shape)
        prior.append(lp)
        q.append(lq)
        sf = force_score_function or not g["fn"].has_rsample
        if sf:
            has_sf = True
            q_sf.append(lq)
        if analytic_kl:
            site_kl = None if sf else _try_kl(g["fn"], site["fn"])
            if site_kl is None:
                kl_free.append(lp - lq)
            else:
                kls.append(_per_datapoint(site, site_kl, particle_dim, shape))

    for name, g in aux_sites.items():  # auxiliary guide sites (an autoguide's unconstrained draws): in q only
        sf = force_score_function or not g["fn"].has_rsample
        has_sf = has_sf or sf
        if _data_dim(g) is None:
            glob_names.append(name)
            lq = _global_term(g, g["fn"].log_prob(g["value"]), particle_dim, num_particles)
            glob.append(-lq)
            if sf:
                glob_sf.append(lq)
            continue
        lq = _per_datapoint(g, g["fn"].log_prob(g["value"]), particle_dim, shape)
        q.append(lq)
        if sf:
            q_sf.append(lq)
        if analytic_kl:
            kl_free.append(-lq)

    missing = set(guide_sites) - {n for n, _ in _sample_sites(model_trace)}
    if missing:
        raise DGMError(f"guide samples sites the model does not have: {sorted(missing)}")
    zeros = torch.zeros(shape, device=_any_device(model_trace))

    def total(terms: list) -> Tensor:
        return zeros if not terms else terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)

    log_lik, log_prior, log_q = total(lik), total(prior), total(q)
    return LogWeights(
        log_w=log_lik + (log_prior - log_q) if q else log_lik,
        log_lik=log_lik,
        log_prior=log_prior,
        log_q=log_q,
        log_q_sf=total(q_sf),
        has_sf=has_sf,
        scale=(frame.full_size or frame.size) / frame.size,
        kl=total(kls) if analytic_kl else None,
        kl_free_log_ratio=total(kl_free) if analytic_kl else None,
        global_log_ratio=_sum(glob, num_particles, zeros) if glob_names else None,
        global_log_q_sf=_sum(glob_sf, num_particles, zeros) if glob_sf else None,
        global_sites=tuple(glob_names),
    )


def _sum(terms: list, num_particles: int, like: Tensor) -> Tensor:
    return torch.stack(terms).sum(0) if terms else like.new_zeros(num_particles)


def global_sites(trace) -> Tuple[str, ...]:
    """Names of the latent sites of ``trace`` outside the data plate."""
    return tuple(n for n, s in _sample_sites(trace) if not s["is_observed"] and _data_dim(s) is None)


def draw_globals(
    model: Callable, guide: Optional[Callable], args: tuple = (), kwargs: Optional[dict] = None, *, max_plate_nesting=1
) -> Dict[str, Tensor]:
    """One draw of every latent site outside the data plate, ``{name: [1, ...]}``: from the
    guide where it samples the site, else from the model's prior (given the guide's draws),
    ready for ``compute_log_weights(..., fixed_globals=...)``. Local sites drawn on the way
    are discarded."""
    kwargs = kwargs or {}
    particle_dim = -(max_plate_nesting + 1)

    def particles(fn, skip=()):
        return _particle_plate(1, particle_dim)(_ShareGlobals(1, 1, particle_dim, skip=skip)(fn))

    if guide is None:
        model_trace = poutine.trace(particles(model)).get_trace(*args, **kwargs)
    else:
        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        replayed = poutine.replay(particles(model, skip=guide_trace.nodes), trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return {name: model_trace.nodes[name]["value"] for name in global_sites(model_trace)}


def _try_kl(q, p) -> Optional[Tensor]:
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _any_device(trace) -> torch.device:
    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(site["value"], Tensor):
            return site["value"].device
    return torch.device("cpu")

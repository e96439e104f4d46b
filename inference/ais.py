"""Annealed importance sampling (Neal 2001) with Hamiltonian Monte Carlo transitions: an
estimate of log p(x) for any model whose latent sites are continuous, one value per datapoint.

The target is built from the Pyro program alone, never from model-specific code. For a
state ``z`` of the latent sites (one value per chain and datapoint), the model is run under
``poutine.condition(model, data=z)`` inside a particle plate of size ``C`` (chains) at dim
``-(max_plate_nesting + 1)``, and each site's ``log_prob`` is summed per datapoint over the
``"data"`` plate (``inference.logweights``' reduction), which gives ``log p(x_b, z_cb)`` for
every chain ``c`` and datapoint ``b`` in one pass. HMC moves in an unconstrained space: a
site with constrained support is reached through ``u -> biject_to(support)(u)`` and the
log-abs-det-Jacobian of that map is added to every density. All sites of a datapoint are
flattened into one vector, so the chains are one tensor ``[C, B, D]``.

Path: ``p_t(z) ∝ q0(z)^(1 - beta_t) p(x, z)^beta_t``, ``0 = beta_0 < ... < beta_T = 1``, with
``q0`` the prior (``start="prior"``; ``z_0`` drawn by running the model) or the guide
(``start="guide"``; ``z_0 ~ q(z | x)``, latent sites the guide does not sample are drawn
from the prior given the others, as in importance sampling). Schedules: ``linear``, and
``sigmoid`` (Grosse et al. 2015; Wu et al. 2017): ``beta_t = sigmoid(delta (2 t / T - 1))``
rescaled to ``[0, 1]``, ``delta = 4``, which spends more steps near both ends. With
``f(z) = log p(x, z) - log q0(z)``, each chain's log-weight is
``sum_{t=1}^{T} (beta_t - beta_{t-1}) f(z_{t-1})``, where ``z_t`` is ``z_{t-1}`` moved by one
HMC transition that leaves ``p_t`` invariant (``T - 1`` transitions; none after the last
increment, where it could not change the weight). ``log p_hat(x)`` is the log-mean-exp of
the ``C`` log-weights. With ``T = 1`` the weight is ``f(z_0)``: importance sampling with
``K = C`` (naive Monte Carlo for ``start="prior"``), drawn from the same random stream.
``E[p_hat] = p(x)``; by Jensen ``E[log p_hat] <= log p(x)``, so AIS is a stochastic lower
bound that tightens as ``T`` grows.

Reverse AIS (``reverse=True``; bidirectional Monte Carlo, ``inference.bdmc``): the same
path walked from ``beta = 1`` to ``beta = 0``, started from given latent values
(``initial``), which must be exact posterior samples ``z* ~ p(z | x)`` (as for data
simulated from the model). The log-weight is
``sum_{t=1}^{T} (beta_{T-t} - beta_{T-t+1}) f(z_{t-1})`` with the HMC transitions at
``beta_{T-1}, ..., beta_1``; now ``E[exp(log_w)] = 1 / p(x)``, so
``-log mean_c exp(log_w_c)`` is a stochastic upper bound of log p(x) that tightens as ``T``
grows (Grosse et al. 2015).

HMC: ``L`` leapfrog steps, identity mass matrix, a Metropolis-Hastings accept/reject per
chain (a proposal with a NaN energy is rejected). The step size is one per datapoint,
shared by its chains, and adapted between transitions toward an acceptance rate of 0.65
as Wu et al.'s code does: multiplied by 1.02 when the fraction of the datapoint's chains
that accepted at the last transition exceeds 0.65, else by 0.98, clipped to
``[1e-4, 0.5]`` (start 0.01).

Validity. Given its step size, each transition is an exact HMC kernel for its ``p_t``: the
leapfrog map is volume-preserving and reversible under momentum flip, so the
Metropolis-Hastings correction makes ``p_t`` invariant. The step size used at transition
``t`` is fixed before transition ``t`` is taken, from the acceptances of transitions
``1..t-1``; it never depends on the proposal or the accept decision at ``t``, so each
transition really is one of these kernels (a step size that reacted to the move being
made would not be). AIS is unbiased for any sequence of kernels each leaving its own
``p_t`` invariant when the sequence is fixed independently of the chains (Neal 2001).
Here it is chosen from the chains' own past, so that theorem applies exactly with
``adapt=False`` (a fixed step size); with adaptation the sequence depends on any single
chain only through the acceptance fractions of its datapoint's ``C`` chains, an influence
that shrinks as ``C`` grows (the adapted sequence then tends to a deterministic one), so
the estimate stays consistent; this is the scheme of Wu et al. (2017), and the tests check
both that the adapted kernel leaves its target's moments unchanged and that AIS matches
PPCA's exact log p(x).

Memory is fixed in ``T``: only the current state, its gradient and the running float64
log-weights are kept (no per-step history).

Random numbers come from the global torch RNG (as the other estimators), or, with
``seed``, from one stream per datapoint seeded from ``(seed, dataset index)``, so that a
datapoint's estimate does not depend on the batch it is evaluated in.

Diagnostics per datapoint: ``stderr``, the delta-method standard error across chains
``sqrt(1 / ESS - 1 / C)``; ``ess = (sum w)^2 / sum w^2`` over the chains; ``accept``, the
mean acceptance rate over chains and transitions (NaN for ``T = 1``).

References: R. M. Neal, "Annealed importance sampling", Statistics and Computing 11, 2001;
R. B. Grosse, Z. Ghahramani and R. P. Adams, "Sandwiching the marginal likelihood using
bidirectional Monte Carlo", arXiv:1511.02543, 2015; Y. Wu, Y. Burda, R. Salakhutdinov and
R. Grosse, "On the quantitative analysis of decoder-based generative models", ICLR 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyro.poutine as poutine
import torch
from torch import Tensor
from torch.distributions import Transform, biject_to, constraints
from tqdm.auto import tqdm

from inference.config import EvalConfig
from inference.estimators import ESTIMATORS, Estimate, Estimator
from inference.logweights import _data_dim, _particle_plate, _per_datapoint, _sample_sites
from models.base import DGMError, GenerativeModel

SCHEDULES = ("sigmoid", "linear")
SIGMOID_RADIUS = 4.0
TARGET_ACCEPT = 0.65
STEP_UP, STEP_DOWN = 1.02, 0.98
STEP_MIN, STEP_MAX = 1e-4, 0.5
INITIAL_STEP = 0.01

Potential = Callable[[Tensor], Tuple[Tensor, Tensor, tuple]]
"""``z [C, B, D] -> (log density [C, B], its gradient [C, B, D], aux)``; ``aux`` is a tuple
of tensors with leading dims ``[C, B]`` carried along with the state."""


# --- the annealing schedule -----------------------------------------------------------------
def beta(name: str, t: int, steps: int) -> float:
    """``beta_t`` of the ``linear`` or ``sigmoid`` schedule with ``T = steps`` (computed per
    step, so nothing of size ``T`` is kept)."""
    if name == "linear":
        return t / steps
    if name == "sigmoid":
        if t in (0, steps):
            return float(t == steps)

        def s(u: int) -> float:
            return 1.0 / (1.0 + math.exp(-SIGMOID_RADIUS * (2.0 * u / steps - 1.0)))

        return (s(t) - s(0)) / (s(steps) - s(0))
    raise DGMError(f"unknown AIS schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def schedule(name: str, steps: int) -> Tensor:
    """``beta_0 = 0, ..., beta_T = 1`` (float64, ``[T + 1]``) of the ``linear`` or ``sigmoid``
    schedule with ``T = steps``."""
    if steps < 1:
        raise DGMError(f"AIS needs at least one step, got {steps}")
    return torch.tensor([beta(name, t, steps) for t in range(steps + 1)], dtype=torch.float64)


# --- HMC ----------------------------------------------------------------------------------------
def potential_from(log_density: Callable[[Tensor], Tensor]) -> Potential:
    """The :data:`Potential` of a log-density ``z [C, B, D] -> [C, B]`` (its gradient by autograd)."""

    def fn(z: Tensor):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            logp = log_density(z)
            return logp.detach(), _grad(logp, z), ()

    return fn


def hmc_step(
    potential: Potential,
    z: Tensor,
    logp: Tensor,
    grad: Tensor,
    step_size: Tensor,
    leapfrog: int,
    *,
    aux: tuple = (),
    final: Optional[Potential] = None,
    normal: Optional[Callable[[], Tensor]] = None,
    uniform: Optional[Callable[[], Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor, tuple, Tensor]:
    """One HMC transition of every chain ``z [C, B, D]`` targeting ``potential``'s density.

    ``logp``, ``grad`` and ``aux`` belong to ``z``; ``step_size [B]`` is one step size per
    datapoint (column ``b``); ``leapfrog`` steps with an identity mass matrix, then a
    Metropolis-Hastings accept/reject per chain. ``final`` (default ``potential``) evaluates
    the last leapfrog position, so that a caller can carry more there in ``aux``.
    ``normal`` / ``uniform`` draw the momentum ``[C, B, D]`` and the uniforms ``[C, B]``
    (float64); default: the global torch RNG. Returns the new ``(z, logp, grad, aux)`` and
    the accept indicators ``[C, B]``.
    """
    if leapfrog < 1:
        raise DGMError(f"HMC needs at least one leapfrog step, got {leapfrog}")
    final = final or potential
    eps = step_size.to(z.dtype).view(1, -1, 1)
    p0 = normal() if normal is not None else torch.randn_like(z)
    p = p0 + 0.5 * eps * grad
    q = z
    for i in range(leapfrog):
        q = q + eps * p
        if i < leapfrog - 1:
            p = p + eps * potential(q)[1]
        else:
            logp_new, grad_new, aux_new = final(q)
            p = p + 0.5 * eps * grad_new
    h0 = logp.double() - 0.5 * p0.double().pow(2).sum(-1)
    h1 = logp_new.double() - 0.5 * p.double().pow(2).sum(-1)
    log_ratio = h1 - h0
    log_ratio = torch.where(torch.isnan(log_ratio), -math.inf, log_ratio)
    u = uniform() if uniform is not None else torch.rand(log_ratio.shape, dtype=torch.float64, device=z.device)
    accepted = torch.log(u) < log_ratio

    def pick(new: Tensor, old: Tensor) -> Tensor:
        return torch.where(accepted.view(accepted.shape + (1,) * (new.dim() - 2)), new, old)

    return (
        pick(q, z),
        pick(logp_new, logp),
        pick(grad_new, grad),
        tuple(pick(n, o) for n, o in zip(aux_new, aux)),
        accepted,
    )


def adapt_step_size(step_size: Tensor, accept_rate: Tensor) -> Tensor:
    """Wu et al.'s rule: ``x 1.02`` where the acceptance rate exceeds 0.65, else ``x 0.98``,
    clipped to ``[1e-4, 0.5]``."""
    factor = torch.where(accept_rate > TARGET_ACCEPT, STEP_UP, STEP_DOWN).to(step_size.dtype)
    return (step_size * factor).clamp(STEP_MIN, STEP_MAX)


# --- the target, from the Pyro program ----------------------------------------------------------
def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


@dataclass
class _Site:
    """A latent site's place in the flat unconstrained state ``[C, B, D]``."""

    name: str
    site: dict  # the trace node (its plates), with no mask: for per-datapoint sums
    transform: Optional[Transform]  # None: real support, z = u
    batch_ndim: int  # of the constrained value, as sampled
    u_shape: Tuple[int, ...]  # the unconstrained value, as sampled
    permuted: Tuple[int, ...]  # u with one leading dim per plate, particles and data first
    inverse: List[int]
    offset: int
    size: int

    def unpack(self, state: Tensor) -> Tensor:
        u = state[..., self.offset : self.offset + self.size].reshape(self.permuted)
        return u.permute(self.inverse).reshape(self.u_shape)


def _total(terms: List[Tensor], zeros: Tensor) -> Tensor:
    return zeros if not terms else terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)


def _grad(y: Tensor, x: Tensor, retain: bool = False) -> Tensor:
    if not y.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


class AnnealedTarget:
    """``log q0(z) + log|J|`` and ``f(z) = log p(x, z) - log q0(z)`` per chain and datapoint
    ``[C, B]`` at an unconstrained state ``[C, B, D]``, from the model (and guide) program.

    Built from ``trace``, a model trace under the particle plate whose latent values are the
    initial state; ``guide_sites`` names the sites the guide proposes (empty: start at the
    prior)."""

    def __init__(self, model, guide, x, kwargs, trace, guide_sites, chains, max_plate_nesting, what, exact=False):
        self.model, self.guide, self.x, self.kwargs = model, guide, x, kwargs
        self.chains, self.particle_dim = chains, -(max_plate_nesting + 1)
        self.guide_sites = set(guide_sites)
        self.sites: List[_Site] = []
        parts, offset = [], 0
        n = -self.particle_dim
        for name, site in _sample_sites(trace):
            if site["is_observed"]:
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise DGMError(
                    f"AIS moves continuous latents, but site {name!r} of {what} is discrete ({fn.support}); "
                    f"use --estimator {'exact' if exact else 'is'}"
                )
            value = site["value"].detach()
            transform = None if _is_real(fn.support) else biject_to(fn.support)
            u = value if transform is None else transform.inv(value)
            u_event = fn.event_dim + (
                0 if transform is None else transform.domain.event_dim - transform.codomain.event_dim
            )
            nb = u.dim() - u_event
            if nb > n:
                raise DGMError(
                    f"site {name!r} has {nb} batch dims but the particle plate sits at dim {self.particle_dim}; "
                    "raise the model's max_plate_nesting"
                )
            data_dim = _data_dim(site)
            if data_dim is None:
                raise DGMError(f"site {name!r} is outside the 'data' plate; AIS needs every latent site inside it")
            full = u.reshape((1,) * (n - nb) + tuple(u.shape))
            d = n + data_dim
            perm = [0, d] + [i for i in range(full.dim()) if i not in (0, d)]
            permuted = full.permute(perm)
            if permuted.shape[0] != chains or permuted.shape[1] != x.shape[0]:
                raise DGMError(f"site {name!r} is not batched over the chains and datapoints ({list(value.shape)})")
            size = int(np.prod(permuted.shape[2:], dtype=np.int64))
            self.sites.append(
                _Site(
                    name,
                    {**site, "mask": None},
                    transform,
                    value.dim() - fn.event_dim,
                    tuple(u.shape),
                    tuple(permuted.shape),
                    [perm.index(i) for i in range(full.dim())],
                    offset,
                    size,
                )
            )
            parts.append(permuted.reshape(chains, x.shape[0], size))
            offset += size
        if not self.sites:
            raise DGMError(f"{what} has no latent sites; AIS has nothing to anneal (use --estimator exact)")
        missing = self.guide_sites - {s.name for s in self.sites}
        if missing:
            raise DGMError(f"guide samples sites the model does not have: {sorted(missing)}")
        self.initial = torch.cat(parts, -1)
        self.shape = (chains, x.shape[0])

    def _particles(self, fn):
        return _particle_plate(self.chains, self.particle_dim)(fn)

    def terms(self, state: Tensor) -> Tuple[Tensor, Tensor]:
        """``(log q0(z(u)) + log|J(u)|, f(z(u)))``, each ``[C, B]``, differentiable in ``state``."""
        zeros = state.new_zeros(self.shape)
        values, jac = {}, []
        for s in self.sites:
            u = s.unpack(state)
            if s.transform is None:
                values[s.name] = u
                continue
            z = s.transform(u)
            ldj = s.transform.log_abs_det_jacobian(u, z)
            if ldj.dim() > s.batch_ndim:
                ldj = ldj.sum(list(range(s.batch_ndim - ldj.dim(), 0)))
            jac.append(_per_datapoint(s.site, ldj, self.particle_dim, self.shape))
            values[s.name] = z
        model_trace = poutine.trace(poutine.condition(self._particles(self.model), data=values)).get_trace(
            self.x, **self.kwargs
        )
        lik, prior_g, prior_rest, q = [], [], [], []
        for name, site in _sample_sites(model_trace):
            if name not in values and not site["is_observed"]:
                raise DGMError(f"site {name!r} appeared after the first run of the model; AIS needs fixed latent sites")
            lp = _per_datapoint(site, site["fn"].log_prob(site["value"]), self.particle_dim, self.shape)
            if name not in values:
                lik.append(lp)
            else:
                (prior_g if name in self.guide_sites else prior_rest).append(lp)
        if self.guide_sites:
            data = {name: values[name] for name in self.guide_sites}
            guide_trace = poutine.trace(poutine.condition(self._particles(self.guide), data=data)).get_trace(
                self.x, **self.kwargs
            )
            for name, site in _sample_sites(guide_trace):
                if name in self.guide_sites:
                    q.append(_per_datapoint(site, site["fn"].log_prob(site["value"]), self.particle_dim, self.shape))
            log_lik, log_prior, log_q = _total(lik, zeros), _total(prior_g, zeros), _total(q, zeros)
            f = log_lik + (log_prior - log_q)  # the order of inference.logweights' log_w
            base = log_q + _total(prior_rest, zeros)
        else:
            f = _total(lik, zeros)
            base = _total(prior_rest, zeros)
        return base + _total(jac, zeros), f

    def potential(self, beta: float) -> Potential:
        """``log p_beta`` and its gradient (inside a leapfrog trajectory)."""

        def fn(state: Tensor):
            with torch.enable_grad():
                state = state.detach().requires_grad_(True)
                base, f = self.terms(state)
                logp = base + beta * f
                return logp.detach(), _grad(logp, state), ()

        return fn

    def split(self, state: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(base, f, d base / du, d f / du)``: enough for ``log p_beta`` and its gradient at
        every ``beta``."""
        with torch.enable_grad():
            state = state.detach().requires_grad_(True)
            base, f = self.terms(state)
            g_base = _grad(base, state, retain=f.requires_grad)
            g_f = _grad(f, state)
        return base.detach(), f.detach(), g_base, g_f

    def final(self, beta: float) -> Potential:
        """As :meth:`potential`, carrying ``split``'s terms in ``aux`` (the trajectory's end)."""

        def fn(state: Tensor):
            base, f, g_base, g_f = self.split(state)
            return base + beta * f, g_base + beta * g_f, (base, f, g_base, g_f)

        return fn


# --- random streams -------------------------------------------------------------------------------
def _stream_seed(seed: int, key: int, purpose: int) -> int:
    """A 63-bit seed of the stream ``purpose`` of the datapoint with dataset index ``key``."""
    hi, lo = (int(v) for v in np.random.SeedSequence([seed, key, purpose]).generate_state(2, np.uint32))
    return (hi << 31) ^ lo


def _rows(kwargs: dict, b: int, n: int) -> dict:
    """``kwargs`` of row ``b`` alone (tensors with one row per datapoint are sliced)."""
    return {k: v[b : b + 1] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v for k, v in kwargs.items()}


def _draw_initial(model, guide, x, kwargs, chains, particle_dim) -> Tuple[dict, set]:
    """A model trace under the particle plate whose latent values are ``z_0``: ancestral
    samples (``guide=None``) or the guide's, the model's other latent sites drawn from the
    prior given them. Draws in the order ``inference.logweights.compute_log_weights`` does."""

    def particles(fn):
        return _particle_plate(chains, particle_dim)(fn)

    if guide is None:
        return poutine.trace(particles(model)).get_trace(x, **kwargs), set()
    guide_trace = poutine.trace(particles(guide)).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(x, **kwargs)
    return model_trace, {name for name, site in _sample_sites(guide_trace) if not site["is_observed"]}


def _concat_traces(traces: Sequence):
    """One trace whose latent values are the datapoints' (each traced alone) side by side."""
    first = traces[0]
    for name, site in _sample_sites(first):
        if site["is_observed"]:
            continue
        pos = site["value"].dim() - site["fn"].event_dim + _data_dim(site)
        site["value"] = torch.cat([t.nodes[name]["value"] for t in traces], pos)
    return first


def _start_at(trace, initial: Dict[str, Tensor]) -> None:
    """Set every latent site of ``trace`` (drawn under the particle plate) to ``initial``'s
    value for it, the same for every chain."""
    latent = [(name, site) for name, site in _sample_sites(trace) if not site["is_observed"]]
    names = {name for name, _ in latent}
    if set(initial) != names:
        raise DGMError(
            f"initial values are for sites {sorted(initial)} but the model's latent sites are {sorted(names)}"
        )
    for name, site in latent:
        old = site["value"]
        value = initial[name].detach().to(device=old.device, dtype=old.dtype)
        try:
            site["value"] = value.expand(old.shape).clone()
        except RuntimeError:
            raise DGMError(
                f"the initial value of site {name!r} has shape {list(value.shape)}, which does not broadcast to "
                f"the chains' {list(old.shape)}"
            ) from None


# --- the estimator ------------------------------------------------------------------------------
def ais(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    schedule_name: str = "sigmoid",
    idx: Optional[Tensor] = None,
    size: Optional[int] = None,
    max_plate_nesting: int = 1,
    conditions: Optional[Dict[str, Tensor]] = None,
    step_size: float = INITIAL_STEP,
    adapt: bool = True,
    seed: Optional[int] = None,
    progress: bool = False,
    what: str = "the model",
    has_exact_log_prob: bool = False,
    initial: Optional[Dict[str, Tensor]] = None,
    reverse: bool = False,
) -> Estimate:
    """AIS estimate of log p(x) for one batch ``x``: ``T = steps`` distributions, ``C =
    chains`` chains per datapoint, HMC with ``leapfrog`` steps; from the guide's ``q(z | x)``
    when ``guide`` is given, else from the prior. ``conditions`` go to model and guide as
    keywords (as in ``importance``); ``seed`` gives every datapoint its own random streams
    (keyed by its dataset index ``idx``, else its row). Returns log p(x), its standard error,
    the chains' ESS and mean acceptance rate per datapoint.

    ``initial``: one value per latent site, shaped as the model samples it for ``x`` without
    chains (``[B, ...]``); every chain starts there instead of at a draw from ``q0``.
    ``reverse``: anneal backwards, ``beta`` from 1 to 0 (reverse AIS, Grosse et al. 2015),
    started at ``initial``, which must then be exact posterior samples (one per datapoint):
    the log-weight ``sum_t (beta_{T-t} - beta_{T-t+1}) f(z)`` has ``E[exp] = 1 / p(x)``, and
    the returned ``log_px = -log mean_c exp(log_w_c)`` is a stochastic upper bound of
    log p(x) (``stderr``, ``ess`` and ``accept`` are those of the reverse chains)."""
    if reverse and initial is None:
        raise DGMError("reverse AIS starts from exact posterior samples: pass them as initial")
    for value, flag in ((steps, "--steps"), (chains, "--chains"), (leapfrog, "--leapfrog")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DGMError(f"{flag} must be an integer >= 1, got {value!r}")
    if schedule_name not in SCHEDULES:
        raise DGMError(f"unknown AIS schedule {schedule_name!r}; choose from {', '.join(SCHEDULES)}")
    b = x.shape[0]
    particle_dim = -(max_plate_nesting + 1)
    kwargs = {"idx": idx, "size": size} if idx is not None else {}
    kwargs.update(conditions or {})
    normal = uniform = None
    with torch.no_grad():
        if seed is None:
            trace, guide_sites = _draw_initial(model, guide, x, kwargs, chains, particle_dim)
        else:
            keys = idx.tolist() if idx is not None else list(range(b))
            traces = []
            devices = [x.device] if x.device.type == "cuda" else []
            for row, key in enumerate(keys):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(_stream_seed(seed, int(key), 0))
                    trace, guide_sites = _draw_initial(
                        model, guide, x[row : row + 1], _rows(kwargs, row, b), chains, particle_dim
                    )
                traces.append(trace)
            trace = _concat_traces(traces)
            gens = [torch.Generator(device=x.device).manual_seed(_stream_seed(seed, int(k), 1)) for k in keys]
        if initial is not None:
            _start_at(trace, initial)
        target = AnnealedTarget(
            model, guide, x, kwargs, trace, guide_sites, chains, max_plate_nesting, what, has_exact_log_prob
        )
        del trace
        state = target.initial
        if seed is not None:
            dim = state.shape[-1]

            def normal():
                return torch.cat(
                    [torch.randn(chains, 1, dim, generator=g, dtype=state.dtype, device=x.device) for g in gens], 1
                )

            def uniform():
                return torch.cat(
                    [torch.rand(chains, 1, generator=g, dtype=torch.float64, device=x.device) for g in gens], 1
                )

        base, f, g_base, g_f = target.split(state)
        log_w = torch.zeros(chains, b, dtype=torch.float64, device=x.device)
        eps = torch.full((b,), float(step_size), dtype=torch.float64, device=x.device)
        accepts = torch.zeros(b, dtype=torch.float64, device=x.device)
        bar = tqdm(total=steps, desc="AIS", disable=not progress, leave=False, mininterval=2.0)

        def level(t: int) -> float:  # the t-th inverse temperature along the path taken
            return beta(schedule_name, steps - t if reverse else t, steps)

        previous = level(0)
        for t in range(1, steps + 1):
            current = level(t)
            log_w += (current - previous) * f.double()
            previous = current
            if t < steps:
                state, _, _, (base, f, g_base, g_f), accepted = hmc_step(
                    target.potential(current),
                    state,
                    base + current * f,
                    g_base + current * g_f,
                    eps,
                    leapfrog,
                    aux=(base, f, g_base, g_f),
                    final=target.final(current),
                    normal=normal,
                    uniform=uniform,
                )
                rate = accepted.double().mean(0)
                accepts += rate
                if adapt:
                    eps = adapt_step_size(eps, rate)  # fixed before the next transition is taken
            bar.update(1)
        bar.close()
    if torch.isnan(log_w).any():
        raise DGMError("AIS log-weights are NaN: the model or guide produced invalid densities")
    log_px = torch.logsumexp(log_w, 0) - math.log(chains)
    if reverse:
        log_px = -log_px  # the mean weight estimates 1 / p(x)
    w = torch.softmax(log_w, 0)
    ess = 1.0 / w.pow(2).sum(0)
    stderr = (1.0 / ess - 1.0 / chains).clamp_min(0).sqrt()
    accept = accepts / (steps - 1) if steps > 1 else torch.full((b,), float("nan"), dtype=torch.float64)
    nan = torch.full((b,), float("nan"), dtype=torch.float64)
    return Estimate(log_px.cpu(), stderr.cpu(), ess.cpu(), nan, nan.clone(), "ais", chains, accept=accept.cpu())


@ESTIMATORS.register(
    "ais",
    "annealed importance sampling with HMC (Neal 2001; Wu et al. 2017): --steps T distributions from the prior "
    "(or the guide) to the posterior, --chains C per datapoint, --leapfrog L steps; continuous latents",
)
class AIS(Estimator):
    """Annealed importance sampling (:func:`ais`) with the settings of ``EvalConfig``."""

    name = "ais"
    settings = ("steps", "chains", "leapfrog", "ais_start", "ais_schedule")
    reports = ("nll", "nll_stderr", "mc_stderr_mean", "ess_mean", "accept_mean")
    trust = ("mc_stderr_mean", "accept_mean")  # the chains' spread, and whether HMC moved

    def __init__(self, config: EvalConfig):
        super().__init__(config)
        self.uses_guide = config.ais_start == "guide"  # per instance: the guide is used only to start from

    def estimate(self, model: GenerativeModel, x, *, guide=None, idx=None, size=None, conditions=None) -> Estimate:
        c = self.config
        est = ais(
            model.model,
            (guide or model.guide) if self.uses_guide else None,
            x,
            steps=c.steps,
            chains=c.chains,
            leapfrog=c.leapfrog,
            schedule_name=c.ais_schedule,
            idx=idx,
            size=size,
            max_plate_nesting=model.max_plate_nesting,
            conditions=conditions,
            progress=self.progress,
            what=type(model).__name__,
            has_exact_log_prob=model.has_exact_log_prob,
        )
        est.settings = self.describe_settings()
        return est

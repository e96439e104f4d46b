"""Tiny models with exact objectives, for the gradient tests of the objectives.

Each model holds ``n`` independent copies of one problem, with every parameter (model and
guide) stored per copy, so one backward pass of a loss summed over the copies gives ``n``
independent gradient estimates, one per parameter row (``estimates``).

* :class:`GaussCopies`: ``z ~ N(mu, 1)``, ``x | z ~ N(z, 1)``, ``q(z) = N(m, s^2)``:
  closed-form ELBO and posterior; IWAE and Renyi bounds of K samples by Gauss-Hermite
  quadrature over the K standard-normal draws (``gauss_bound``), differentiable.
* :class:`BitsCopies`: ``h ~ Bernoulli(sigmoid(c))^H``, ``x | h ~ Bernoulli(sigmoid(W h +
  b))^D``, ``q(h) = Bernoulli(sigmoid(phi))^H``: every K-tuple of latent configurations
  enumerated (``bits_gradient``), differentiable.
"""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from models.base import DataSpec, GenerativeModel
from models.latent.sbn import all_binary_vectors


def estimates(model, loss, names):
    """``{name: [n, ...]}`` per-copy gradient estimates of the objective (minus the loss's gradient)."""
    model.zero_grad()
    loss.backward()
    return {name: -getattr(model, name).grad.detach().clone() for name in names}


def power_mean_bound(log_w, alpha: float, dim: int = -1):
    """``1 / (1 - alpha) log mean_k w_k^(1 - alpha)`` (alpha = 1: ``mean_k log w_k``)."""
    k = log_w.shape[dim]
    if alpha == 1:
        return log_w.mean(dim)
    return (torch.logsumexp((1 - alpha) * log_w, dim) - math.log(k)) / (1 - alpha)


# --- Gaussian ---------------------------------------------------------------------------------
class GaussCopies(GenerativeModel):
    def __init__(self, n: int, x: float = 0.7, mu: float = 0.3, m: float = 0.2, s: float = 0.8):
        super().__init__(DataSpec((1,), "real"))
        self.mu = nn.Parameter(torch.full((n,), mu))
        self.m = nn.Parameter(torch.full((n,), m))
        self.s = nn.Parameter(torch.full((n,), s))
        self.data = torch.full((n, 1), x)

    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", dist.Normal(self.mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[..., 0])

    def guide(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            pyro.sample("z", dist.Normal(self.m, self.s))

    def sample(self, n):
        raise NotImplementedError

    def set_posterior(self) -> None:
        """q = p(z | x) = N((mu + x) / 2, 1 / 2) for every copy."""
        with torch.no_grad():
            self.m.copy_((self.mu + self.data[:, 0]) / 2)
            self.s.fill_(math.sqrt(0.5))


def gauss_elbo_gradient(x=0.7, mu=0.3, m=0.2, s=0.8):
    """``(dmu, dm, ds)`` of ELBO = -(m - mu)^2 / 2 - (x - m)^2 / 2 - s^2 + log s + const."""
    return torch.tensor([m - mu, (mu - m) + (x - m), -2 * s + 1 / s], dtype=torch.float64)


def gauss_bound(k: int, alpha: float = 0.0, x=0.7, mu=0.3, m=0.2, s=0.8, nodes: int = 40):
    """``(E[VR_alpha,K], d/d(mu, m, s))`` by Gauss-Hermite quadrature over the K draws."""
    eps, wts = np.polynomial.hermite_e.hermegauss(nodes)
    eps = torch.tensor(eps, dtype=torch.float64)
    wts = torch.tensor(wts / math.sqrt(2 * math.pi), dtype=torch.float64)
    grid = torch.cartesian_prod(*[eps] * k).reshape(-1, k)
    weight = torch.cartesian_prod(*[wts] * k).reshape(-1, k).prod(-1)
    params = torch.tensor([mu, m, s], dtype=torch.float64, requires_grad=True)
    mu_, m_, s_ = params
    z = m_ + s_ * grid
    log_w = (
        dist.Normal(mu_, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(torch.tensor(x))
        - dist.Normal(m_, s_).log_prob(z)
    )
    value = (weight * power_mean_bound(log_w, alpha)).sum()
    (grad,) = torch.autograd.grad(value, params)
    return value.item(), grad


# --- Bernoulli latents ------------------------------------------------------------------------
class BitsCopies(GenerativeModel):
    def __init__(self, n: int, bits: int = 2, pixels: int = 3, seed: int = 0, x=None):
        super().__init__(DataSpec((pixels,), "binary"))
        g = torch.Generator().manual_seed(seed)
        self.prior_logits = nn.Parameter(torch.randn(bits, generator=g).expand(n, bits).clone())
        self.W = nn.Parameter(torch.randn(pixels, bits, generator=g).mul(1.5).expand(n, pixels, bits).clone())
        self.b = nn.Parameter(torch.randn(pixels, generator=g).expand(n, pixels).clone())
        self.phi = nn.Parameter(torch.randn(bits, generator=g).expand(n, bits).clone())
        x = torch.tensor([1.0, 0.0, 1.0] + [0.0] * (pixels - 3))[:pixels] if x is None else x
        self.data = x.expand(n, pixels).clone()

    names = ("prior_logits", "W", "b", "phi")

    def logits(self, h):
        return torch.einsum("...nh,ndh->...nd", h, self.W) + self.b

    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            h = pyro.sample("h", dist.Bernoulli(logits=self.prior_logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.logits(h)).to_event(1), obs=x)

    def guide(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            pyro.sample("h", dist.Bernoulli(logits=self.phi).to_event(1))

    def sample(self, n):
        raise NotImplementedError

    def row(self, i: int = 0):
        """Copy ``i``'s parameters as fresh leaves ``{name: tensor}`` (float64)."""
        return {name: getattr(self, name)[i].detach().double().clone().requires_grad_() for name in self.names}


def bits_tables(p, x):
    """``(log p(x, h), log q(h))`` for every configuration ``h`` ``[C]``, from one copy's parameters."""
    hs = all_binary_vectors(p["phi"].shape[-1], torch.float64)
    prior = dist.Bernoulli(logits=p["prior_logits"]).log_prob(hs).sum(-1)
    lik = dist.Bernoulli(logits=hs @ p["W"].T + p["b"]).log_prob(x.double()).sum(-1)
    log_q = dist.Bernoulli(logits=p["phi"]).log_prob(hs).sum(-1)
    return prior + lik, log_q


def bits_gradient(model: BitsCopies, k: int, fn, score: bool = True):
    """Exact gradient of ``E_q[fn]`` w.r.t. copy 0's parameters ``{name: tensor}``; with
    ``score=False`` the sampling probabilities are held fixed (the expectation of a fixed-weight
    estimator, e.g. RWS's wake updates)."""
    p = model.row(0)
    log_p, log_q = bits_tables(p, model.data[0])
    c = log_p.shape[0]
    tuples = torch.tensor(list(itertools.product(range(c), repeat=k)))
    lp, lq = log_p[tuples], log_q[tuples]
    prob = lq.sum(-1).exp()
    if not score:
        prob = prob.detach()
    value = (prob * fn(lp - lq, lq, lp)).sum()
    grads = torch.autograd.grad(value, list(p.values()), allow_unused=True)
    return {name: (torch.zeros_like(p[name]) if g is None else g) for name, g in zip(p, grads)}


def assert_unbiased(est, exact, z: float = 4.5, atol: float = 1e-9):
    """Each coordinate of the mean of the per-copy estimates within ``z`` standard errors of ``exact``."""
    for name, e in est.items():
        e = e.double()
        mean, se = e.mean(0), e.std(0) / math.sqrt(e.shape[0])
        ex = exact[name].to(mean.dtype).reshape(mean.shape)
        ok = (mean - ex).abs() <= z * se + atol
        assert ok.all(), (
            f"{name}: mean {mean.flatten().tolist()} exact {ex.flatten().tolist()} se {se.flatten().tolist()}"
        )

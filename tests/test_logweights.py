"""The log-weight core (``inference.logweights.compute_log_weights``): per-datapoint
``log w = log p(x, z) - log q(z | x)`` against PPCA's densities computed by hand, the
minibatch scale N / B, proposals from the prior, score-function bookkeeping, and the
global terms of latent sites outside the data plate (float64)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from inference.logweights import compute_log_weights
from models.base import DataSpec, DGMError, GenerativeModel
from tests.test_ppca import Q, make_model

K, B = 4, 5


def _ppca_and_data():
    """PPCA with its default linear encoder left random (a guide far from the posterior, so
    log w varies with z) and five datapoints."""
    model = make_model()
    x = model.sample(B, generator=torch.Generator().manual_seed(2))
    return model, x


def _log_joint(model, x, z):
    """``(log p(x | z), log p(z))`` from the PPCA formulas, ``[K, B]`` each."""
    normal = torch.distributions.Normal
    log_lik = normal(z @ model.W.T + model.mu, model.sigma2.sqrt()).log_prob(x).sum(-1)
    return log_lik, normal(0.0, 1.0).log_prob(z).sum(-1)


def test_log_weights_are_log_joint_minus_log_guide_at_the_traced_samples(float64):
    model, x = _ppca_and_data()
    guide = poutine.trace(model.guide)  # keeps the trace that compute_log_weights draws
    with torch.no_grad():
        lw = compute_log_weights(model.model, guide, (x,), num_particles=K)
        z = guide.msngr.trace.nodes["z"]["value"]
        assert z.shape == (K, B, Q) and z.std(0).min() > 0  # K different draws per datapoint
        log_lik, log_prior = _log_joint(model, x, z)
        A, b, L = model.encoder.A, model.encoder.b, model.encoder.scale_tril
        log_q = torch.distributions.MultivariateNormal(x @ A.T + b, scale_tril=L).log_prob(z)
    assert lw.log_w.shape == (K, B) and lw.num_particles == K
    torch.testing.assert_close(lw.log_lik, log_lik, rtol=0, atol=1e-10)
    torch.testing.assert_close(lw.log_prior, log_prior, rtol=0, atol=1e-10)
    torch.testing.assert_close(lw.log_q, log_q, rtol=0, atol=1e-10)
    torch.testing.assert_close(lw.log_w, log_lik + log_prior - log_q, rtol=0, atol=1e-10)
    assert lw.scale == 1.0


def test_scale_is_dataset_size_over_batch_size_under_subsampling(float64):
    """A minibatch of B = 5 rows of a dataset of N = 20: log w stays per datapoint and
    unscaled ([K, B], the same density as without subsampling); ``scale`` is N / B = 4."""
    model, x = _ppca_and_data()
    idx = torch.tensor([3, 17, 8, 0, 12])
    with torch.no_grad():
        pyro.set_rng_seed(1)
        full = compute_log_weights(model.model, model.guide, (x,), num_particles=K)
        pyro.set_rng_seed(1)
        sub = compute_log_weights(model.model, model.guide, (x, idx, 20), num_particles=K)
    assert sub.scale == 20 / B and full.scale == 1.0
    assert sub.log_w.shape == (K, B)
    torch.testing.assert_close(sub.log_w, full.log_w, rtol=0, atol=0)


def test_without_a_guide_the_log_weight_is_the_log_likelihood_at_prior_draws(float64):
    """guide=None proposes z from the prior: p(z) / q(z) cancels, log w = log p(x | z)."""
    model, x = _ppca_and_data()
    traced = poutine.trace(model.model)
    with torch.no_grad():
        lw = compute_log_weights(traced, None, (x,), num_particles=K)
        z = traced.msngr.trace.nodes["z"]["value"]
        log_lik, _ = _log_joint(model, x, z)
    assert lw.log_w.shape == (K, B) and not lw.has_sf
    torch.testing.assert_close(lw.log_w, log_lik, rtol=0, atol=1e-10)
    torch.testing.assert_close(lw.log_lik, log_lik, rtol=0, atol=1e-10)
    assert torch.equal(lw.log_prior, torch.zeros(K, B)) and torch.equal(lw.log_q, torch.zeros(K, B))


def test_score_function_terms_only_where_needed_or_forced(float64):
    """The linear Gaussian encoder is reparameterized: no score-function term, and log p(x | z)
    carries the pathwise gradient to the encoder. Forced, every guide site is a score-function
    site (``log_q_sf = log_q``) and its samples are detached (no pathwise gradient)."""
    model, x = _ppca_and_data()
    reparam = compute_log_weights(model.model, model.guide, (x,), num_particles=K)
    assert not reparam.has_sf and torch.equal(reparam.log_q_sf, torch.zeros(K, B))
    assert torch.autograd.grad(reparam.log_lik.sum(), model.encoder.A, allow_unused=True)[0] is not None
    forced = compute_log_weights(model.model, model.guide, (x,), num_particles=K, force_score_function=True)
    assert forced.has_sf
    torch.testing.assert_close(forced.log_q_sf, forced.log_q, rtol=0, atol=0)
    assert torch.autograd.grad(forced.log_lik.sum(), model.encoder.A, allow_unused=True)[0] is None


def test_global_sites_go_to_global_log_ratio_counted_once_and_local_terms_stay_per_datapoint(float64):
    """A site outside the data plate: its log p - log q is ``global_log_ratio`` ``[K]``, not
    part of ``log_w``; each particle draws its own unless ``global_draws`` shares them."""

    class Global(GenerativeModel):
        def __init__(self):
            super().__init__(DataSpec((1,), "real"))

        def model(self, x, idx=None, size=None):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with self.data_plate(x, idx, size):
                pyro.sample("x", dist.Normal(w.unsqueeze(-1), 1.0).to_event(1), obs=x)

        def guide(self, x, idx=None, size=None):
            pyro.sample("w", dist.Normal(0.5, 0.3))

    g = Global()
    x = torch.tensor([[0.1], [-0.4], [1.2]])
    guide = poutine.trace(g.guide)
    with torch.no_grad():
        lw = compute_log_weights(g.model, guide, (x,), num_particles=K)
        w = guide.msngr.trace.nodes["w"]["value"].reshape(K)
        shared = compute_log_weights(g.model, g.guide, (x,), num_particles=K, global_draws=1)
    normal = torch.distributions.Normal
    assert lw.global_sites == ("w",) and lw.has_globals and w.unique().numel() == K
    torch.testing.assert_close(lw.global_log_ratio, normal(0.0, 1.0).log_prob(w) - normal(0.5, 0.3).log_prob(w))
    torch.testing.assert_close(lw.log_w, normal(w[:, None], 1.0).log_prob(x.T))
    assert torch.all(shared.global_log_ratio == shared.global_log_ratio[0])
    with pytest.raises(DGMError, match=r"renyi does not support latent sites outside the 'data' plate \(w\)"):
        lw.refuse_globals("renyi")

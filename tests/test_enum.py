"""The enumerated ELBO (``inference.enum.EnumELBO``): exact sums over enumerated discrete
sites in the model and in the guide, against closed forms and Pyro's ``TraceEnum_ELBO``
(float64, fixed seeds)."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO

from inference.enum import EnumELBO
from tests.test_mixtures import MIXTURES, bernoulli_mixture, mixture_and_data
from tests.test_sbn import tiny_sbn


@pytest.mark.parametrize("kind", MIXTURES)
def test_model_enumerated_elbo_equals_exact_log_prob(float64, kind):
    """With an empty guide, z is summed out in the model: ELBO = log p(x) per datapoint,
    and a subsampled minibatch's loss is -(N / B) sum_b log p(x_b)."""
    m, x = mixture_and_data(kind, n=10, encoder=False)
    with torch.no_grad():
        exact = m.log_prob(x)
    bound = EnumELBO().bound(m.model, m.guide, x)
    torch.testing.assert_close(bound, exact, rtol=0, atol=1e-6)
    idx = torch.tensor([2, 5, 7])
    loss, terms = EnumELBO(max_plate_nesting=1).loss_terms(m.model, m.guide, x[idx], idx, 10)
    torch.testing.assert_close(loss, -(10 / 3) * m.log_prob(x[idx]).sum(), rtol=0, atol=1e-9)
    torch.testing.assert_close(terms["bound"], exact[idx].mean(), rtol=0, atol=1e-9)


def test_guide_enumerated_elbo_is_the_exact_expectation_under_q(float64):
    """With z enumerated in the guide, ELBO = sum_z q(z|x) [log p(x, z) - log q(z|x)] (no
    sampling noise, any number of particles); with q the exact posterior (a linear encoder
    can represent it for a Bernoulli mixture) it equals log p(x)."""
    m = bernoulli_mixture(d=6, k=3)
    with torch.no_grad():
        m.encoder[-1].weight.normal_()
    x = m.sample(12)
    q = torch.distributions.Categorical(logits=m.encoder(x))
    expected = (q.probs * (m.joint_log_prob(x) - q.logits)).sum(-1)
    for particles in (1, 3):
        torch.testing.assert_close(EnumELBO(particles).bound(m.model, m.guide, x), expected.detach())
    with torch.no_grad():  # posterior logits: log pi_k + x . l_k - sum_d softplus(l_kd)
        m.encoder[-1].weight.copy_(m.logits)
        m.encoder[-1].bias.copy_(m.log_weights - torch.nn.functional.softplus(m.logits).sum(-1))
        exact = m.log_prob(x)
    torch.testing.assert_close(EnumELBO().bound(m.model, m.guide, x), exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("encoder", [False, True])
def test_enum_elbo_total_and_gradients_equal_pyro_trace_enum_elbo(float64, encoder):
    m, x = mixture_and_data("bernoulli", n=9, encoder=encoder)
    idx = torch.arange(9)
    ours = EnumELBO(max_plate_nesting=1).differentiable_loss(m.model, m.guide, x, idx, 30)
    grads = torch.autograd.grad(ours, list(m.parameters()), allow_unused=True)
    theirs = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(m.model, m.guide, x, idx, 30)
    ref = torch.autograd.grad(theirs, list(m.parameters()), allow_unused=True)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(grads, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_enum_elbo_drives_pyro_svi(float64):
    m, x = mixture_and_data("bernoulli", n=50, encoder=False)
    model, guide = m.svi_pair()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), EnumELBO())
    before = m.log_prob(x).mean().item()
    for _ in range(30):
        svi.step(x)
    assert m.log_prob(x).mean().item() > before


def test_enum_elbo_on_sampled_sites_equals_pyro_trace_enum_elbo(float64):
    """With nothing to enumerate the enumerated ELBO is Pyro's DiCE estimator: same value
    and gradients for the same random draws, and a minibatch scaled by N / B."""
    m = tiny_sbn((2, 2), seed=4)
    x = m.sample(5)
    idx = torch.arange(5)
    params = list(m.parameters())
    torch.manual_seed(11)
    ours = EnumELBO(max_plate_nesting=1).differentiable_loss(m.model, m.guide, x, idx, 40)
    ours_g = torch.autograd.grad(ours, params)
    torch.manual_seed(11)
    pyro_elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    theirs = pyro_elbo.differentiable_loss(m.model, m.guide, x, idx, 40)
    theirs_g = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b)

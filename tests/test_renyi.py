"""The variational Renyi bound: its limits (IWAE at alpha = 0, the ELBO at alpha -> 1),
its ordering in alpha, and unbiased gradients."""

import math

import pyro
import pytest
import torch

from inference.config import ConfigError, ObjectiveConfig
from inference.objective import make_objective
from inference.objectives import ELBO, IWAE
from inference.renyi import RenyiBound
from models.base import DataSpec, DGMError
from models.latent.vae import VAE, VAEConfig
from tests.objective_cases import (
    BitsCopies,
    GaussCopies,
    assert_unbiased,
    bits_gradient,
    estimates,
    gauss_bound,
    power_mean_bound,
)


def small_vae():
    return VAE(DataSpec((12,), "binary"), VAEConfig(latent_dim=3, encoder_hidden=(7,), decoder_hidden=(7,)))


def _loss_and_grads(module, objective, *args, seed=3):
    pyro.set_rng_seed(seed)
    module.zero_grad()
    loss = objective.differentiable_loss(module.model, module.guide, *args)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("case", ["vae", "bits"])
def test_alpha_zero_is_iwae_exactly(float64, case):
    """Values and gradients, reparameterized (VAE) and score-function (Bernoulli) sites."""
    if case == "vae":
        m, x = small_vae(), torch.bernoulli(torch.full((5, 12), 0.3))
    else:
        m = BitsCopies(6)
        x = m.data
    a = _loss_and_grads(m, RenyiBound(5, alpha=0.0), x)
    b = _loss_and_grads(m, IWAE(5), x)
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["vae", "bits"])
def test_alpha_one_is_the_elbo_and_alpha_near_one_approaches_it(float64, case):
    if case == "vae":
        m, x = small_vae(), torch.bernoulli(torch.full((5, 12), 0.3))
    else:
        m = BitsCopies(6)
        x = m.data
    a = _loss_and_grads(m, RenyiBound(5, alpha=1.0), x)
    b = _loss_and_grads(m, ELBO(5), x)
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    gaps = []
    for eps in (1e-2, 1e-4, 1e-6):
        near = _loss_and_grads(m, RenyiBound(5, alpha=1 - eps), x)
        gaps.append(abs(near[0] - b[0]))
        if case == "vae":  # pathwise gradients converge too; score-function ones differ per sample (their
            torch.testing.assert_close(near[1], b[1], rtol=0, atol=50 * eps)  # learning signals do)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


def test_bound_does_not_increase_with_alpha_for_the_same_samples(float64):
    """A power mean grows with its exponent 1 - alpha, so VR_alpha falls with alpha; at
    alpha = 0 it is IWAE and at 1 the ELBO, on the same draws, per datapoint."""
    m, x = small_vae(), torch.bernoulli(torch.full((5, 12), 0.3))
    bounds = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0):
        pyro.set_rng_seed(4)
        bounds.append(RenyiBound(8, alpha=alpha).bound(m.model, m.guide, x))
    for hi, lo in zip(bounds, bounds[1:]):
        assert (lo <= hi + 1e-12).all()
    assert (bounds[0] - bounds[4] > 1e-3).all()  # the weights are not all equal
    pyro.set_rng_seed(4)
    torch.testing.assert_close(bounds[0], IWAE(8).bound(m.model, m.guide, x), rtol=0, atol=0)
    pyro.set_rng_seed(4)
    torch.testing.assert_close(bounds[4], ELBO(8).bound(m.model, m.guide, x), rtol=0, atol=0)


def test_gradient_is_unbiased_against_quadrature(float64, one_thread):
    """alpha = 0.5, K = 2 on the Gaussian model: the mean of 20,000 independent estimates is
    the gradient of E[VR] by Gauss-Hermite quadrature."""
    _, exact = gauss_bound(2, alpha=0.5)
    g = GaussCopies(20000)
    pyro.set_rng_seed(1)
    est = estimates(g, RenyiBound(2, alpha=0.5).differentiable_loss(g.model, g.guide, g.data), ("mu", "m", "s"))
    assert_unbiased(est, dict(zip(("mu", "m", "s"), exact)))


def test_score_function_gradient_is_unbiased_against_enumeration(float64, one_thread):
    """alpha = 0.5, K = 3, Bernoulli latents: every 3-tuple of configurations enumerated."""
    m = BitsCopies(20000)
    exact = bits_gradient(m, 3, lambda lw, lq, lp: power_mean_bound(lw, 0.5))
    pyro.set_rng_seed(0)
    est = estimates(m, RenyiBound(3, alpha=0.5).differentiable_loss(m.model, m.guide, m.data), m.names)
    assert_unbiased(est, exact)
    assert exact["phi"].abs().min() > 5 * est["phi"].std(0).max() / math.sqrt(20000)  # the test has power


def test_alpha_is_checked():
    with pytest.raises(DGMError, match="--alpha must be a finite number >= 0"):
        make_objective(ObjectiveConfig(name="renyi", alpha=-0.5))
    with pytest.raises(ConfigError, match="--alpha"):
        RenyiBound(2, alpha=float("nan"))
    assert make_objective(ObjectiveConfig(name="renyi", k=3, alpha=0.25)).alpha == 0.25


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_equals_pyro_renyi_elbo_for_one_datapoint(float64, alpha):
    """For a batch of one datapoint Pyro's RenyiELBO is our bound (for more, Pyro sums the
    batch inside the power mean); values and gradients from the same draws."""
    m = small_vae()
    x = torch.bernoulli(torch.full((1, 12), 0.3))
    ours = _loss_and_grads(m, RenyiBound(6, alpha=alpha), x, seed=0)
    pm, pg = m.svi_pair()
    pyro.set_rng_seed(0)
    m.zero_grad()
    theirs = pyro.infer.RenyiELBO(alpha=alpha, num_particles=6, max_plate_nesting=2, vectorize_particles=True)
    value = theirs.loss_and_grads(pm, pg, x)
    assert ours[0] == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(ours[1], torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))


def test_the_description_of_a_renyi_run_names_its_alpha():
    from inference.config import ObjectiveConfig

    assert ObjectiveConfig(name="renyi", k=5, alpha=0.25).describe() == "renyi K=5 alpha=0.25"
    assert ObjectiveConfig(name="iwae", k=5, alpha=0.25).describe() == "iwae K=5"

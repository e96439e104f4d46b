"""STL (sticking the landing): the ELBO gradient without the guide's score term."""

import math

import pyro
import pytest
import torch

from inference.config import ObjectiveConfig
from inference.objective import make_objective
from inference.objectives import ELBO, IWAE
from inference.stl import STL
from models.base import DataSpec, DGMError
from models.latent.sbn import SBN, SBNConfig
from models.latent.vae import VAE, VAEConfig
from tests.objective_cases import (
    BitsCopies,
    GaussCopies,
    assert_unbiased,
    estimates,
    gauss_bound,
    gauss_elbo_gradient,
)

N = 20000
GAUSS = ("mu", "m", "s")


def _gauss_estimates(objective, n=N, seed=1, posterior=False):
    g = GaussCopies(n)
    if posterior:
        g.set_posterior()
    pyro.set_rng_seed(seed)
    return estimates(g, objective.differentiable_loss(g.model, g.guide, g.data), GAUSS)


def test_stl_elbo_gradient_is_unbiased_against_the_closed_form(float64, one_thread):
    """K = 1: the mean of 20,000 independent estimates is the closed-form ELBO gradient in
    the guide's (m, s) and the model's (mu) parameters; the guide's spread is below the ELBO's."""
    exact = dict(zip(GAUSS, gauss_elbo_gradient()))
    stl = _gauss_estimates(STL(1))
    assert_unbiased(stl, exact)
    elbo = _gauss_estimates(ELBO(1))
    for name in ("m", "s"):
        assert stl[name].std() < 0.5 * elbo[name].std()


@pytest.mark.parametrize("k", [1, 4])
def test_stl_sticks_the_landing(float64, one_thread, k):
    """With q the exact posterior, log w is constant in z: every STL estimate of the guide's
    gradient is zero, while the ELBO's and IWAE's estimates (score term kept) are not."""
    stl = _gauss_estimates(STL(k), n=500, posterior=True)
    for name in ("m", "s"):
        assert stl[name].abs().max() < 1e-10
    plain = _gauss_estimates(IWAE(k), n=500, posterior=True)
    assert plain["m"].std() > 0.1 and plain["s"].std() > 0.1


def test_stl_iwae_guide_gradient_is_biased_and_model_gradient_is_not(float64, one_thread):
    """K = 2 (Tucker et al. 2019, sec. 3): dropping the score term from IWAE biases the
    guide's gradient (far outside the standard error of the quadrature value); the model's
    gradient is IWAE's and unbiased."""
    _, exact = gauss_bound(2)
    est = _gauss_estimates(STL(2))
    assert_unbiased({"mu": est["mu"]}, {"mu": exact[0]})
    m = est["m"]
    assert (m.mean() - exact[1]).abs() > 20 * m.std() / math.sqrt(N)


def test_stl_model_gradient_equals_iwae_from_the_same_samples(float64):
    m = VAE(DataSpec((12,), "binary"), VAEConfig(latent_dim=3, encoder_hidden=(7,), decoder_hidden=(7,)))
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    grads = {}
    for name, objective in (("stl", STL(4)), ("iwae", IWAE(4))):
        pyro.set_rng_seed(2)
        m.zero_grad()
        loss = objective.differentiable_loss(m.model, m.guide, x)
        loss.backward()
        grads[name] = (loss.item(), [p.grad.clone() for p in m.decoder.parameters()])
    assert grads["stl"][0] == pytest.approx(grads["iwae"][0], rel=1e-12)
    for a, b in zip(grads["stl"][1], grads["iwae"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stl_refuses_non_reparameterizable_guides(float64):
    sbn = SBN(DataSpec((6,), "binary"), SBNConfig(layers=(3,)))
    objective = make_objective(ObjectiveConfig(name="stl", k=2))
    with pytest.raises(DGMError, match="stl needs reparameterizable guide sites, but site 'h1' \\(Bernoulli\\)"):
        objective.check(sbn)
    bits = BitsCopies(4)
    with pytest.raises(DGMError, match="reparameterizable"):
        objective.differentiable_loss(bits.model, bits.guide, bits.data)

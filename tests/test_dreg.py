"""DReG: doubly reparameterized IWAE gradients (Tucker et al. 2019)."""

import pyro
import pytest
import torch

from inference.config import ObjectiveConfig
from inference.dreg import DReG
from inference.objective import make_objective
from inference.objectives import IWAE
from models.base import DataSpec, DGMError
from models.latent.sbn import SBN, SBNConfig
from models.latent.vae import VAE, VAEConfig
from models.latent.vae2 import VAE2
from tests.objective_cases import GaussCopies, assert_unbiased, estimates, gauss_bound

GAUSS = ("mu", "m", "s")


def _gauss_estimates(objective, n=20000, seed=1, posterior=False):
    g = GaussCopies(n)
    if posterior:
        g.set_posterior()
    pyro.set_rng_seed(seed)
    return estimates(g, objective.differentiable_loss(g.model, g.guide, g.data), GAUSS)


@pytest.mark.parametrize("k", [2, 3])
def test_dreg_gradient_expectation_equals_iwae(float64, one_thread, k):
    """The mean of 20,000 independent DReG estimates is the gradient of E[IWAE_K] (Gauss-
    Hermite quadrature over the K draws) in the guide's (m, s) and the model's (mu)
    parameters; the guide's estimates spread far less than IWAE's."""
    _, exact = gauss_bound(k, nodes=40 if k == 2 else 30)
    dreg = _gauss_estimates(DReG(k))
    assert_unbiased(dreg, dict(zip(GAUSS, exact)))
    iwae = _gauss_estimates(IWAE(k))
    assert_unbiased(iwae, dict(zip(GAUSS, exact)))
    for name in ("m", "s"):
        assert dreg[name].std() < 0.25 * iwae[name].std()


def test_dreg_model_gradient_is_iwae_and_guide_gradient_is_not(float64):
    """From the same samples the decoder's gradient (and the loss) equal IWAE's; the
    encoder's differ (squared weights, no score term)."""
    m = VAE(DataSpec((12,), "binary"), VAEConfig(latent_dim=3, encoder_hidden=(7,), decoder_hidden=(7,)))
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    out = {}
    for name, objective in (("dreg", DReG(4)), ("iwae", IWAE(4))):
        pyro.set_rng_seed(2)
        m.zero_grad()
        loss = objective.differentiable_loss(m.model, m.guide, x)
        loss.backward()
        encoder = torch.cat([p.grad.flatten() for p in m.encoder.parameters()])
        out[name] = (loss.item(), [p.grad.clone() for p in m.decoder.parameters()], encoder)
    assert out["dreg"][0] == pytest.approx(out["iwae"][0], rel=1e-12)
    for a, b in zip(out["dreg"][1], out["iwae"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out["dreg"][2], out["iwae"][2])


def _snr(objective, k, n=2000):
    est = _gauss_estimates(objective(k), n=n, seed=0)["m"]
    return (est.mean().abs() / est.std()).item()


def test_dreg_encoder_snr_does_not_fall_with_k(float64, one_thread):
    """Rainforth et al. 2018: the encoder gradient's signal-to-noise ratio (|mean| / std over
    2,000 independent estimates) falls as 1/sqrt(K) for IWAE; for DReG it does not fall."""
    dreg = {k: _snr(DReG, k) for k in (1, 10, 100)}
    iwae = {k: _snr(IWAE, k) for k in (1, 10, 100)}
    assert dreg[10] >= 0.9 * dreg[1] and dreg[100] >= 0.9 * dreg[10], dreg
    assert iwae[100] < 0.5 * iwae[1], iwae
    assert dreg[100] > 10 * iwae[100]


def test_dreg_guide_gradient_is_zero_at_the_posterior(float64, one_thread):
    est = _gauss_estimates(DReG(5), n=500, posterior=True)
    assert est["m"].abs().max() < 1e-10 and est["s"].abs().max() < 1e-10


def test_dreg_refuses_discrete_and_hierarchical_guides(float64):
    objective = make_objective(ObjectiveConfig(name="dreg", k=3))
    with pytest.raises(DGMError, match="dreg needs reparameterizable guide sites, but site 'h1'"):
        objective.check(SBN(DataSpec((6,), "binary"), SBNConfig(layers=(3,))))
    vae2 = VAE2(DataSpec((6,), "binary"))
    with pytest.raises(DGMError, match="dreg needs guide sites that do not condition on other sampled latents"):
        objective.check(vae2)
    objective.check(VAE(DataSpec((6,), "binary"), VAEConfig(latent_dim=2)))  # a one-site Gaussian guide: accepted
    with pytest.raises(DGMError, match="depends on 'h1'"):  # without check(), as pyro.infer.SVI calls it
        DReG(2).differentiable_loss(vae2.model, vae2.guide, torch.zeros(3, 6))

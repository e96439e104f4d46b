"""VIMCO: leave-one-out baselines, unbiased against enumeration, lower variance."""

import math

import pyro
import pytest
import torch

from inference.config import ConfigError, ObjectiveConfig
from inference.objective import make_objective
from inference.objectives import IWAE
from inference.vimco import VIMCO, leave_one_out_bounds
from tests.objective_cases import BitsCopies, GaussCopies, assert_unbiased, bits_gradient, estimates

N = 20000


def iwae_bound(lw, lq, lp):
    return torch.logsumexp(lw, -1) - math.log(lw.shape[-1])


def _bits_estimates(objective, seed=0):
    m = BitsCopies(N)
    pyro.set_rng_seed(seed)
    return m, estimates(m, objective.differentiable_loss(m.model, m.guide, m.data), m.names)


def test_leave_one_out_bounds_by_hand(float64):
    log_w = torch.tensor([[0.3, -1.0], [-2.0, 0.5], [1.2, 0.0]])  # K = 3, B = 2
    out = leave_one_out_bounds(log_w)
    for k in range(3):
        others = [j for j in range(3) if j != k]
        geo = log_w[others].mean(0)
        expected = torch.log((log_w[others].exp().sum(0) + geo.exp()) / 3)
        torch.testing.assert_close(out[k], expected)


def test_vimco_gradient_is_unbiased_against_enumeration(float64, one_thread):
    """K = 3 Bernoulli latents: the mean of 20,000 independent estimates is the exact gradient
    of E[IWAE_3] (all 64 triples of configurations enumerated), guide and model parameters."""
    m, est = _bits_estimates(VIMCO(3))
    exact = bits_gradient(m, 3, iwae_bound)
    assert_unbiased(est, exact)
    assert exact["phi"].abs().min() > 20 * est["phi"].std(0).max() / math.sqrt(N)  # the test has power


def test_vimco_guide_gradient_variance_is_below_the_plain_score_function(float64, one_thread):
    """The same samples (seed) through IWAE's plain score-function estimator (learning signal
    IWAE_K for every sample, no baseline) and through VIMCO: the guide gradient's variance
    falls at least tenfold; the model's gradient is the same."""
    _, vimco = _bits_estimates(VIMCO(3))
    _, plain = _bits_estimates(IWAE(3))
    assert (vimco["phi"].var(0) < 0.1 * plain["phi"].var(0)).all()
    for name in ("prior_logits", "W", "b"):
        torch.testing.assert_close(vimco[name], plain[name], rtol=1e-10, atol=1e-12)


def test_reparameterized_sites_keep_their_pathwise_gradient(float64):
    """No score-function site: VIMCO is IWAE, gradients included."""
    out = []
    for objective in (VIMCO(4), IWAE(4)):
        g = GaussCopies(50)
        pyro.set_rng_seed(5)
        out.append(estimates(g, objective.differentiable_loss(g.model, g.guide, g.data), ("mu", "m", "s")))
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=0, atol=0)


def test_vimco_needs_two_samples():
    with pytest.raises(ConfigError, match="vimco needs --k >= 2"):
        make_objective(ObjectiveConfig(name="vimco", k=1))

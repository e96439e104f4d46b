"""Finite mixtures against brute-force sums over components and numerical integration
(float64, fixed seeds). Their enumerated ELBO is tested in ``test_enum``, their EM in
``test_em``."""

from __future__ import annotations

import pytest
import torch

from experiments import data as datasets
from inference.config import ObjectiveConfig
from inference.em import run_em
from inference.estimators import estimate_dataset
from inference.objective import make_objective
from inference.runner import Runner, TrainConfig
from models import MODELS
from models.base import DataError, DataSpec, DGMError
from models.latent.bernoulli_mixture import BernoulliMixture, BernoulliMixtureConfig
from models.latent.gaussian_mixture import GaussianMixture, GaussianMixtureConfig


def bernoulli_mixture(d=6, k=3, seed=0, **kw) -> BernoulliMixture:
    torch.manual_seed(seed)
    m = BernoulliMixture(DataSpec((d,), "binary"), BernoulliMixtureConfig(num_components=k, init_scale=2.0, **kw))
    with torch.no_grad():
        m.weight_logits.normal_()
    return m.double()


def gaussian_mixture(k=3, seed=0, covariance="full", **kw) -> GaussianMixture:
    torch.manual_seed(seed)
    m = GaussianMixture(
        DataSpec((2,), "real"), GaussianMixtureConfig(num_components=k, covariance=covariance, init_loc_scale=2.0, **kw)
    ).double()
    with torch.no_grad():
        m.weight_logits.normal_()
        m.raw_scale_tril.normal_(std=0.5)
    return m


def brute_force_log_prob(m, x: torch.Tensor) -> torch.Tensor:
    """``log sum_k pi_k p_k(x)`` with a Python loop over components and torch.distributions."""
    pi = torch.softmax(m.weight_logits, -1)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k in range(m.num_components):
        if isinstance(m, BernoulliMixture):
            comp = torch.distributions.Bernoulli(probs=m.means[k]).log_prob(x).sum(-1)
        else:
            cov = m.scale_tril[k] @ m.scale_tril[k].T
            comp = torch.distributions.MultivariateNormal(m.loc[k], covariance_matrix=cov).log_prob(x)
        total = total + pi[k] * comp.exp()
    return total.log()


def all_binary(d: int) -> torch.Tensor:
    return torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * d)


MIXTURES = {"bernoulli": bernoulli_mixture, "gaussian-full": gaussian_mixture}


def mixture_and_data(kind: str, n: int = 8, **kw):
    m = MIXTURES[kind](**kw)
    return m, m.sample(n)


# --- exact log p(x) ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MIXTURES)
def test_log_prob_equals_brute_force_sum_and_the_exact_estimator(float64, kind):
    m, x = mixture_and_data(kind, n=20)
    with torch.no_grad():
        torch.testing.assert_close(m.log_prob(x), brute_force_log_prob(m, x), rtol=0, atol=1e-12)
        est = estimate_dataset(m, x, method="exact", progress=False)
        torch.testing.assert_close(est.log_px, m.log_prob(x), rtol=0, atol=0)


def test_bernoulli_mixture_sums_to_one_over_all_binary_vectors(float64):
    m = bernoulli_mixture(d=8, k=4)
    with torch.no_grad():
        assert abs(m.log_prob(all_binary(8)).exp().sum().item() - 1.0) < 1e-12


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gaussian_mixture_density_integrates_to_one_on_a_grid(float64, covariance):
    """Fit by EM on the moons, then a midpoint rule on [-5, 5]^2 (the components sit well
    inside): the Riemann sum of exp(log p) is 1 to the rule's accuracy."""
    data = datasets.load("moons")
    m = gaussian_mixture(k=6, covariance=covariance)
    run_em(m, data.train[:2000].double(), steps=20, progress=False)
    n, lo, hi = 500, -5.0, 5.0
    h = (hi - lo) / n
    t = lo + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    grid = torch.cartesian_prod(t, t)
    with torch.no_grad():
        mass = m.log_prob(grid).exp().sum().item() * h * h
    assert abs(mass - 1.0) < 1e-3, mass
    if covariance == "diag":
        tril = m.scale_tril
        assert torch.equal(tril, torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1)))


@pytest.mark.parametrize("method", ["naive", "is"])
def test_sampling_estimators_converge_to_exact_log_prob(float64, method):
    """Both are biased low for small K (Jensen); the error shrinks with K and ends within a
    few standard errors. The guide is a random encoder, not the posterior."""
    m = bernoulli_mixture(d=30, k=8, seed=1, encoder_hidden=(16,))
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.normal_(std=0.3)
    x = m.sample(10)
    exact = m.log_prob(x).detach()
    errors = []
    for k in (3, 30_000):
        est = estimate_dataset(m, x, method=method, num_samples=k, progress=False)
        errors.append((est.log_px - exact).abs().mean().item())
    assert errors[1] < 0.2 * errors[0], errors
    assert ((est.log_px - exact).abs() <= 4 * est.stderr + 1e-3).all(), (est.log_px - exact, est.stderr)
    assert (est.elbo < exact).all()


# --- training through the runner ------------------------------------------------------------
@pytest.mark.parametrize("objective", ["elbo-sf", "elbo-enum"])
def test_training_through_the_runner_improves_the_likelihood(objective):
    data = datasets.load("digits")
    torch.manual_seed(0)
    m = BernoulliMixture(data.spec, BernoulliMixtureConfig(num_components=10))
    with torch.no_grad():
        before = -m.log_prob(data.test).mean().item()
    obj = make_objective(ObjectiveConfig(name=objective, baseline="average"), data.spec)
    runner = Runner(m, data, obj, config=TrainConfig(epochs=3, lr=3e-2, device="cpu", progress=False))
    runner.fit()
    result = runner.evaluate()
    assert result["estimator"] == "exact"
    assert result["nll"] < before - 10, (before, result["nll"])


def test_registry_presets_and_bad_configs():
    assert MODELS["bernoulli_mixture"] is BernoulliMixture and MODELS["gaussian_mixture"] is GaussianMixture
    for cls in (BernoulliMixture, GaussianMixture):
        assert "small" in cls.presets
    assert BernoulliMixture.presets["mnist"].num_components == 500
    with pytest.raises(DataError, match="binarize"):
        BernoulliMixture(DataSpec((4,), "real"))
    with pytest.raises(DataError, match="bernoulli_mixture"):
        GaussianMixture(DataSpec((4,), "binary"))
    with pytest.raises(DGMError, match="covariance"):
        GaussianMixture(DataSpec((2,), "real"), GaussianMixtureConfig(covariance="spherical"))
    m = GaussianMixture(DataSpec((2,), "real"), GaussianMixtureConfig(num_components=2, reg_covar=0.0))
    with pytest.raises(DGMError, match="reg_covar"):  # one repeated point: zero covariance
        m.em_update(torch.tensor([[1.0, 2.0]] * 3))
    with pytest.raises(DGMError, match="num_components"):
        BernoulliMixture(DataSpec((4,), "binary"), BernoulliMixtureConfig(num_components=0))

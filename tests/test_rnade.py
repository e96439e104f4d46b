"""RNADE: the mathematics, asserted.

* normalization: the density integrates to one over a grid covering all its mass (D = 1, 2);
* causality through gradients (and exact invariance): conditional ``i`` depends on ``x_j``
  only for ``j <= i``, on every ``j < i`` and on ``x_i`` itself;
* the vectorized pass equals a hand-written per-dimension loop;
* ancestral samples match the exact first marginal (KS) and the moments of ``x_1``
  computed by quadrature;
* trained through the runner on moons, it beats a maximum-likelihood full-covariance Gaussian.
"""

import math

import pytest
import torch

from experiments import data as datasets
from inference import ELBO, Runner, TrainConfig
from models.autoregressive.rnade import RNADE, RNADEConfig
from models.base import DataError, DataSpec, DGMError
from tests.helpers import fit_exact

pytestmark = pytest.mark.usefixtures("one_thread")


def real(*shape):
    return DataSpec(tuple(shape), "real")


def perturbed(d, hidden, components, scale, seed=0, min_scale=1e-3):
    """A model whose parameters are moved off their initial values by N(0, scale^2) noise,
    so the conditionals differ from one another and depend on their inputs."""
    torch.manual_seed(seed)
    model = RNADE(real(d), RNADEConfig(hidden=hidden, components=components, min_scale=min_scale))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def output_ranges(model):
    """Rigorous bounds over all inputs: since ``h`` lies in ``[0, 1]^H``, every mean lies in
    ``b ± sum |V|`` and every scale between the softplus of those bounds (plus the floor)."""
    spread = model.V.detach().abs().sum(-1)  # [D, 3, K]
    b = model.b.detach()
    mu_max = float((b[:, 1].abs() + spread[:, 1]).max())
    floor = model.config.min_scale
    sigma_min = float(torch.nn.functional.softplus(b[:, 2] - spread[:, 2]).min()) + floor
    sigma_max = float(torch.nn.functional.softplus(b[:, 2] + spread[:, 2]).max()) + floor
    return mu_max, sigma_min, sigma_max


def grid_over(mu_max, sigma_min, sigma_max):
    """A grid over ``[-L, L]`` holding all but ~1e-15 of the mass of any Gaussian with
    ``|mu| <= mu_max`` and ``sigma <= sigma_max`` (8 standard deviations past the farthest
    mean), spaced at half the smallest scale: the trapezoid rule on such Gaussians is then
    exact to ~exp(-8 pi^2), far below the tolerances asserted."""
    half = mu_max + 8 * sigma_max
    n = int(math.ceil(2 * half / (sigma_min / 2))) + 1
    assert n <= 2000, "the test's parameters make too fine a grid"
    return torch.linspace(-half, half, n)


def covering_grid(model):
    """A grid covering every conditional of ``model`` whatever its inputs."""
    return grid_over(*output_ranges(model))


# --- normalization ---------------------------------------------------------------------------


def test_integrates_to_one_in_one_dimension(float64):
    model = perturbed(1, hidden=4, components=3, scale=0.3)
    x0 = covering_grid(model)
    with torch.no_grad():
        density = model.log_prob(x0[:, None]).exp()
    assert abs(float(torch.trapezoid(density, x0)) - 1.0) < 1e-6


def test_integrates_to_one_in_two_dimensions(float64):
    model = perturbed(2, hidden=4, components=3, scale=0.3, seed=1)
    grid = covering_grid(model)
    g0, g1 = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        density = model.log_prob(torch.stack([g0.reshape(-1), g1.reshape(-1)], -1)).exp()
    total = torch.trapezoid(torch.trapezoid(density.reshape(g0.shape), grid, dim=1), grid)
    assert abs(float(total) - 1.0) < 1e-6


# --- causality -------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 7])
def test_conditionals_depend_on_exactly_the_past_and_the_present(float64, d):
    model = perturbed(d, hidden=6, components=3, scale=1.0, seed=d)
    x = torch.randn(5, d, requires_grad=True)
    cond = model.conditional_log_probs(x)
    for i in range(d):
        (grad,) = torch.autograd.grad(cond[:, i].sum(), x, retain_graph=True)
        influence = grad.abs().amax(0)  # [D]: largest effect of x_j on conditional i
        assert (influence[i + 1 :] == 0).all(), f"conditional {i} sees the future"
        assert influence[i] > 1e-8, f"conditional {i} does not depend on x_{i}"
        assert (influence[:i] > 1e-8).all(), f"conditional {i} ignores some of x_<{i}"


@pytest.mark.parametrize("d", [4, 7])
def test_changing_the_future_leaves_earlier_conditionals_unchanged(float64, d):
    model = perturbed(d, hidden=6, components=3, scale=1.0, seed=d)
    x = torch.randn(5, d)
    with torch.no_grad():
        base = model.conditional_log_probs(x)
        for i in range(d):
            y = x.clone()
            y[:, i:] = torch.randn(5, d - i)
            assert torch.equal(model.conditional_log_probs(y)[:, :i], base[:, :i])


# --- the vectorized pass ---------------------------------------------------------------------


def naive_conditional_log_probs(model, x):
    """The defining recursion, one dimension and one formula at a time."""
    W, c, rho, V, b = model.W, model.c, model.rho, model.V, model.b
    out = []
    for i in range(x.shape[1]):
        a = c + x[:, :i] @ W[:, :i].T  # c + W_{:, <i} x_<i
        h = torch.sigmoid(rho[i] * a)
        logits = h @ V[i, 0].T + b[i, 0]
        mu = h @ V[i, 1].T + b[i, 1]
        sigma = torch.log1p(torch.exp(h @ V[i, 2].T + b[i, 2])) + model.config.min_scale
        pi = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        gauss = torch.exp(-((x[:, i : i + 1] - mu) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
        out.append(torch.log((pi * gauss).sum(-1)))
    return torch.stack(out, -1)


def test_vectorized_pass_equals_a_per_dimension_loop(float64):
    model = perturbed(5, hidden=6, components=3, scale=0.5)
    x = torch.randn(20, 5)
    with torch.no_grad():
        fast = model.conditional_log_probs(x)
        slow = naive_conditional_log_probs(model, x)
    assert (fast - slow).abs().max() < 1e-10


# --- sampling ----------------------------------------------------------------------------------


def test_samples_match_the_first_marginal_and_the_moments_of_the_second(float64):
    model = perturbed(2, hidden=8, components=3, scale=0.5, seed=3)
    n = 100_000
    x = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    with torch.no_grad():
        # x_0: its conditional has no past, so its marginal is one closed-form mixture.
        log_pi, mu, sigma = (t[0, 0] for t in model.mixture_params(torch.zeros(1, 2)))
        sorted_x0 = x[:, 0].sort().values
        cdf = (log_pi.exp() * torch.special.ndtr((sorted_x0[:, None] - mu) / sigma)).sum(-1)
        ranks = torch.arange(1, n + 1, dtype=cdf.dtype)
        ks = float(torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max())
        assert ks < 1.95 / math.sqrt(n), f"KS statistic {ks:.4f}"  # p = 0.001

        # x_1: E[f(x_1) | x_0] in closed form, then quadrature over p(x_0).
        grid = grid_over(float(mu.abs().max()), float(sigma.min()), float(sigma.max()))
        points = torch.stack([grid, torch.zeros_like(grid)], -1)
        p0 = model.conditional_log_probs(points)[:, 0].exp()
        log_pi, mu, sigma = (t[:, 1] for t in model.mixture_params(points))
        pi = log_pi.exp()
        exact = {
            "E[x1]": torch.trapezoid(p0 * (pi * mu).sum(-1), grid),
            "E[x1^2]": torch.trapezoid(p0 * (pi * (mu**2 + sigma**2)).sum(-1), grid),
            "E[x0 x1]": torch.trapezoid(p0 * grid * (pi * mu).sum(-1), grid),
        }
        empirical = {"E[x1]": x[:, 1], "E[x1^2]": x[:, 1] ** 2, "E[x0 x1]": x[:, 0] * x[:, 1]}
        for key, values in empirical.items():
            stderr = float(values.std()) / math.sqrt(n)
            gap = abs(float(values.mean() - exact[key]))
            assert gap < 4 * stderr, f"{key}: sample {float(values.mean()):.4f} vs exact {float(exact[key]):.4f}"


# --- training ----------------------------------------------------------------------------------


def test_training_on_moons_beats_a_full_covariance_gaussian():
    data = datasets.load("moons")
    mean = data.train.mean(0)
    cov = torch.cov(data.train.T, correction=0)  # the maximum-likelihood covariance
    baseline = float(-torch.distributions.MultivariateNormal(mean, cov).log_prob(data.test).mean())
    nll = fit_exact(RNADE(data.spec, RNADE.presets["small"]), data, epochs=3, lr=1e-2)
    print(f"moons test NLL: {nll:.3f} nats vs full-covariance Gaussian {baseline:.3f}")
    assert nll < baseline - 0.3


# --- bad data and settings ---------------------------------------------------------------------


def test_wrong_support_and_bad_settings_are_rejected():
    with pytest.raises(DGMError, match="NADE or MADE"):
        RNADE(DataSpec((4,), "binary"))
    with pytest.raises(DGMError, match="NADE or MADE"):
        RNADE(DataSpec((4,), "categorical", num_levels=3))
    with pytest.raises(DGMError, match="hidden"):
        RNADE(real(4), RNADEConfig(hidden=0))
    with pytest.raises(DGMError, match="components"):
        RNADE(real(4), RNADEConfig(components=0))
    with pytest.raises(DGMError, match="min_scale"):
        RNADE(real(4), RNADEConfig(min_scale=0.0))
    with pytest.raises(DataError, match="NaN"):
        RNADE(real(2)).check_data(torch.tensor([[0.0, float("nan")]]))
    digits = datasets.load("digits")  # binary 8x8 images are not a 2-D real dataset
    with pytest.raises(DataError):
        Runner(RNADE(real(2)), digits, ELBO(1), config=TrainConfig(device="cpu", progress=False))

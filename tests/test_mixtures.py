"""Finite mixtures and the enumerated ELBO against brute-force sums over components,
numerical integration, EM's monotonicity and its stationary points (float64, fixed seeds)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO

from experiments import data as datasets
from inference.config import ObjectiveConfig
from inference.em import run_em
from inference.enum import EnumELBO
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


# --- EM ------------------------------------------------------------------------------------
def _em_data(kind: str, n: int = 400):
    truth = MIXTURES[kind](seed=7, k=4)
    return truth.sample(n)


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian-full", "gaussian-diag"])
def test_maximum_likelihood_em_never_decreases_the_log_likelihood(float64, kind):
    base, covariance = (kind, "full") if kind != "gaussian-diag" else ("gaussian-full", "diag")
    x = _em_data(base)
    opts = {"weight_pseudocount": 0.0}
    if base == "bernoulli":
        opts["pixel_pseudocount"] = 0.0
        m = bernoulli_mixture(k=4, seed=3, **opts)
    else:
        m = gaussian_mixture(k=4, seed=3, covariance=covariance, reg_covar=0.0, **opts)
    steps = 40
    history = run_em(m, x, steps=steps, tol=-math.inf, progress=False)
    assert len(history) == steps + 1
    diffs = torch.tensor(history).diff()
    assert (diffs >= -1e-10).all(), diffs.min()
    assert history[-1] > history[0] + 0.5


def test_map_em_never_decreases_the_log_posterior(float64):
    """With pseudo-counts EM maximises log p(x) + log p(theta): that is what must rise."""
    x = _em_data("bernoulli")
    m = bernoulli_mixture(k=4, seed=3, pixel_pseudocount=0.5, weight_pseudocount=2.0)
    values = []
    for _ in range(30):
        with torch.no_grad():
            values.append((m.log_prob(x).sum() + m.log_prior()).item())
        m.em_update(x)
    diffs = torch.tensor(values).diff()
    assert (diffs >= -1e-9).all(), diffs.min()
    assert (m.means > 0).all() and (m.means < 1).all()  # smoothed: no log 0 on unseen pixels


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian-full"])
def test_em_fixed_point_is_a_stationary_point_of_the_likelihood(float64, kind):
    """At convergence of ML-EM the gradient of the log-likelihood vanishes (weights and
    component parameters alike)."""
    x = _em_data(kind)
    if kind == "bernoulli":
        m = bernoulli_mixture(k=3, seed=3, pixel_pseudocount=0.0, weight_pseudocount=0.0)
    else:
        m = gaussian_mixture(k=3, seed=3, reg_covar=0.0, weight_pseudocount=0.0)
    run_em(m, x, steps=3000, tol=1e-13, progress=False)
    m.zero_grad()
    m.log_prob(x).mean().backward()
    params = [m.weight_logits, m.logits] if kind == "bernoulli" else [m.weight_logits, m.loc, m.raw_scale_tril]
    # ML-EM may set a pixel mean to exactly 0 or 1 (clamped to eps): its logit gradient is O(eps)
    worst = max(p.grad.abs().max().item() for p in params)
    assert worst < 1e-6, worst


def test_em_checks_the_data_first(float64):
    m = bernoulli_mixture()
    with pytest.raises(DataError, match="binarize"):
        run_em(m, torch.full((4, 6), 0.5, dtype=torch.float64), progress=False)


# --- the enumerated ELBO -------------------------------------------------------------------
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


# --- EM through the runner (--objective em) ---------------------------------------------------------
def test_runner_em_steps_are_run_em_steps_and_never_decrease_the_likelihood(float64, one_thread):
    import copy
    from dataclasses import replace

    data = datasets.load("digits")  # static binary data: every epoch sees the same training set
    data = replace(data, train=data.train.double(), val=data.val.double(), test=data.test.double())  # model's dtype
    torch.manual_seed(0)
    model = BernoulliMixture(data.spec, BernoulliMixtureConfig(num_components=6, encoder=False)).double()
    reference = copy.deepcopy(model)
    config = TrainConfig(epochs=5, device="cpu", progress=False, validate=False, checkpoint_seconds=1e9)
    runner = Runner(model, data, make_objective(ObjectiveConfig(name="em")), config=config)
    runner.fit()
    history = run_em(reference, data.train.double(), steps=5, tol=-math.inf, progress=False)
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)  # rows permuted: sums reordered
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:]))


def test_dgm_train_em_and_its_errors(tmp_path, one_thread):
    import json

    from experiments.cli import main

    run = tmp_path / "em"
    args = ["train", "bernoulli_mixture", "--preset", "small", "--data", "digits", "--objective", "em"]
    assert main(args + ["--epochs", "4", "--no-progress", "--run-dir", str(run)]) == 0
    train = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    bounds = [r["bound"] for r in train if r["split"] == "train"]
    assert len(bounds) == 4 and all(b >= a - 1e-4 for a, b in zip(bounds, bounds[1:]))  # EM: monotone (float32)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["estimator"] == "exact" and summary["steps"] == 4
    assert (
        main(
            [
                "train",
                "vae",
                "--preset",
                "small",
                "--data",
                "digits",
                "--objective",
                "em",
                "--run-dir",
                str(tmp_path / "v"),
            ]
        )
        == 2
    )  # no closed-form step: one line, exit 2

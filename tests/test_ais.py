"""Annealed importance sampling with HMC (``inference.ais``) against closed forms: PPCA's and
a Gamma-Exponential model's exact log p(x), importance sampling at T = 1, and the moments
of the targets the HMC kernel must leave invariant (float64, fixed seeds)."""

from __future__ import annotations

import gc
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from experiments.cli import main
from inference import ais as ais_module
from inference.ais import adapt_step_size, ais, hmc_step, potential_from, schedule
from inference.config import ConfigError, EvalConfig
from inference.estimators import estimate_dataset, make_estimator
from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.sbn import SBN, SBNConfig
from tests.helpers import train_tiny_vae
from tests.test_ppca import make_model


def _ppca_data(n: int = 5):
    model = make_model()  # its encoder is random: a poor guide
    return model, model.sample(n, generator=torch.Generator().manual_seed(3))


# --- log p(x) against exact values --------------------------------------------------------------
@pytest.mark.parametrize("start", ["prior", "guide"])
def test_ais_converges_to_the_exact_ppca_log_px_within_3_stderr(float64, one_thread, start):
    """Within 3 standard errors of PPCA's exact log p(x) at T = 20 and T = 200, and the
    longer anneal has the smaller error bars. 256 chains: with 16, the delta-method standard
    error from degenerate weights underestimates the error (measured: 22% of datapoints
    beyond 3 SE at T = 20)."""
    model, x = _ppca_data()
    exact = model.log_prob(x).detach()
    stderr = {}
    for steps in (20, 200):
        torch.manual_seed(steps)
        est = ais(model.model, model.guide if start == "guide" else None, x, steps=steps, chains=256, leapfrog=10)
        err = (est.log_px - exact).abs()
        assert (err <= 3 * est.stderr + 1e-3).all(), (steps, err, est.stderr)
        assert ((est.accept >= 0) & (est.accept <= 1)).all()
        stderr[steps] = est.stderr.mean()
    assert stderr[200] < stderr[20]


class GammaExponential(GenerativeModel):
    """``rate ~ Gamma(a, b)``, ``x_d | rate ~ Exponential(rate)``: a positive latent (HMC moves
    ``log rate``), with ``p(x) = b^a Gamma(a + D) / (Gamma(a) (b + sum x)^(a + D))``."""

    a, b = 2.0, 1.0

    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            rate = pyro.sample("rate", dist.Gamma(x.new_tensor(self.a), x.new_tensor(self.b)))
            pyro.sample("x", dist.Exponential(rate.unsqueeze(-1)).to_event(1), obs=x)

    def log_prob(self, x):
        a, b, d = self.a, self.b, x.shape[-1]
        return a * math.log(b) + math.lgamma(a + d) - math.lgamma(a) - (a + d) * torch.log(b + x.sum(-1))


def test_a_constrained_latent_is_annealed_in_unconstrained_space_with_its_jacobian(float64, one_thread):
    model = GammaExponential(DataSpec((5,), "real"))
    x = torch.distributions.Exponential(torch.tensor([[0.25], [1.0], [4.0]])).sample((5,)).squeeze(-1).T
    torch.manual_seed(0)
    est = ais(model.model, None, x, steps=100, chains=256, leapfrog=5)
    err = (est.log_px - model.log_prob(x)).abs()
    assert (err <= 3 * est.stderr + 1e-3).all(), (err, est.stderr)


# --- T = 1 is importance sampling ---------------------------------------------------------------
@pytest.mark.parametrize("start,same", [("guide", "is"), ("prior", "naive")])
def test_one_step_is_importance_sampling_with_k_equal_to_the_chains(float64, start, same):
    """With T = 1 the weight is log p(x, z) - log q0(z) at z ~ q0: AIS from the guide is IS
    with K = C on the same random stream, AIS from the prior the naive estimator."""
    model, x = _ppca_data(7)
    annealed = make_estimator(EvalConfig(estimator="ais", steps=1, chains=12, ais_start=start), model)
    sampled = make_estimator(EvalConfig(estimator=same, k=12), model)
    assert annealed.uses_guide == (start == "guide")
    torch.manual_seed(11)
    a = annealed.estimate(model, x)
    torch.manual_seed(11)
    b = sampled.estimate(model, x)
    for key in ("log_px", "stderr", "ess"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=1e-10)
    assert a.settings == {"steps": 1, "chains": 12, "leapfrog": 10, "ais_start": start, "ais_schedule": "sigmoid"}


def test_schedules_run_from_zero_to_one():
    for name in ("sigmoid", "linear"):
        betas = schedule(name, 10)
        assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    s = torch.sigmoid(4 * torch.linspace(-1, 1, 11, dtype=torch.float64))
    torch.testing.assert_close(schedule("sigmoid", 10), (s - s[0]) / (s[-1] - s[0]))
    assert schedule("sigmoid", 1).tolist() == [0.0, 1.0]


# --- the HMC kernel alone -----------------------------------------------------------------------
def _run_chains(log_density, z, step: float, leapfrog: int, transitions: int, adapt: bool):
    potential = potential_from(log_density)
    logp, grad, _ = potential(z)
    eps = torch.full((z.shape[1],), step, dtype=torch.float64)
    rates = []
    for _ in range(transitions):
        z, logp, grad, _, accepted = hmc_step(potential, z, logp, grad, eps, leapfrog)
        rates.append(accepted.double().mean())
        if adapt:
            eps = adapt_step_size(eps, accepted.double().mean(0))
    return z.reshape(-1, z.shape[-1]), float(torch.stack(rates).mean())


def _assert_moments(samples, stats, expected):
    """Each statistic's sample mean within 4.5 Monte Carlo standard errors of its exact value."""
    for name, g in stats.items():
        values = g(samples)
        se = values.std() / math.sqrt(values.numel())
        assert abs(float(values.mean()) - expected[name]) < 4.5 * float(se), (name, float(values.mean()), float(se))


GAUSS_MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
GAUSS_COV = torch.tensor([[1.0, 0.45], [0.45, 0.25]], dtype=torch.float64)  # correlation 0.9


def _gaussian_stats():
    m, c = GAUSS_MEAN.tolist(), GAUSS_COV
    stats = {
        "x1": lambda s: s[:, 0],
        "x2": lambda s: s[:, 1],
        "x1x1": lambda s: (s[:, 0] - m[0]) ** 2,
        "x2x2": lambda s: (s[:, 1] - m[1]) ** 2,
        "x1x2": lambda s: (s[:, 0] - m[0]) * (s[:, 1] - m[1]),
    }
    expected = {"x1": m[0], "x2": m[1], "x1x1": c[0, 0].item(), "x2x2": c[1, 1].item(), "x1x2": c[0, 1].item()}
    return stats, expected


def _banana_log_density(z):
    x1, x2 = z[..., 0], z[..., 1]
    return -0.5 * x1**2 - 0.5 * (x2 - x1**2) ** 2 / 0.25


def _banana_stats():
    stats = {
        "x1": lambda s: s[:, 0],
        "x2": lambda s: s[:, 1],
        "x1^2": lambda s: s[:, 0] ** 2,
        "x2^2": lambda s: s[:, 1] ** 2,
        "x1x2": lambda s: s[:, 0] * s[:, 1],
    }
    return stats, {"x1": 0.0, "x2": 1.0, "x1^2": 1.0, "x2^2": 3.25, "x1x2": 0.0}  # E x2^2 = E x1^4 + 0.25


@pytest.mark.parametrize("adapt", [False, True])
def test_hmc_leaves_a_correlated_gaussian_invariant(float64, adapt):
    """Chains started at exact draws stay exact draws: after 60 transitions the 4000 x 2
    independent chains have the target's mean and covariance. The fixed step size 0.3 is
    close to the leapfrog's stability limit (2 x the smallest standard deviation, 0.40), where
    dropping the accept/reject step inflates the narrow direction's variance ~2x; adapted
    from 0.2, a step size that is never rejected grows past that limit."""
    torch.manual_seed(0)
    target = torch.distributions.MultivariateNormal(GAUSS_MEAN, GAUSS_COV)
    z = target.sample((4000, 2))
    samples, rate = _run_chains(target.log_prob, z, 0.2 if adapt else 0.3, 5, 60, adapt)
    _assert_moments(samples, *_gaussian_stats())
    assert 0.2 < rate < 1.0


@pytest.mark.parametrize("adapt", [False, True])
def test_hmc_leaves_a_banana_invariant(float64, adapt):
    """x1 ~ N(0, 1), x2 | x1 ~ N(x1^2, 0.5^2): E x2 = 1, E x1^2 = 1, E x2^2 = 3.25, E x1 x2 = 0."""
    torch.manual_seed(1)
    x1 = torch.randn(4000, 2, dtype=torch.float64)
    z = torch.stack([x1, x1**2 + 0.5 * torch.randn_like(x1)], -1)
    samples, rate = _run_chains(_banana_log_density, z, 0.2 if adapt else 0.25, 10, 60, adapt)
    _assert_moments(samples, *_banana_stats())
    assert 0.2 < rate < 1.0


# --- vectorization, refusals, memory --------------------------------------------------------------
@pytest.mark.parametrize("start", ["prior", "guide"])
def test_a_batch_gives_each_datapoint_what_it_gets_alone(float64, one_thread, start):
    """With ``seed`` every datapoint has its own random streams (keyed by its dataset index)
    and its own step size: a batch of 4 reproduces each datapoint run alone."""
    model, x = _ppca_data(4)
    guide = model.guide if start == "guide" else None
    kwargs = dict(steps=30, chains=8, leapfrog=3, size=4, seed=123, step_size=0.1)
    batch = ais(model.model, guide, x, idx=torch.arange(4), **kwargs)
    assert 0 < float(batch.accept.min()) and float(batch.accept.max()) < 1  # adaptation acts on each datapoint
    for b in range(4):
        alone = ais(model.model, guide, x[b : b + 1], idx=torch.tensor([b]), **kwargs)
        for key in ("log_px", "stderr", "ess", "accept"):
            torch.testing.assert_close(getattr(alone, key), getattr(batch, key)[b : b + 1], rtol=0, atol=1e-10)


def test_discrete_latent_sites_are_refused_naming_the_site():
    model = SBN(DataSpec((4,), "binary"), SBNConfig(layers=(2,)))
    estimator = make_estimator(EvalConfig(estimator="ais", steps=2, chains=2, leapfrog=1), model)
    with pytest.raises(DGMError, match=r"site 'h1' of SBN is discrete .*use --estimator exact$"):
        estimate_dataset(model, torch.zeros(3, 4), estimator=estimator, progress=False)


def test_eval_config_refuses_bad_ais_settings():
    for bad in (dict(steps=0), dict(chains=0), dict(leapfrog=0), dict(ais_start="data"), dict(ais_schedule="cos")):
        with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
            EvalConfig(**bad).check()


def test_memory_is_fixed_in_the_number_of_steps(float64, one_thread, monkeypatch):
    """No per-step history: the tensors alive at the 5th step and at the last are the same
    number of values, for T = 30 and for T = 300."""
    alive = {}

    class Probe:  # stands in for the progress bar, which AIS updates once per step
        def __init__(self, total, **_):
            self.total, self.n = total, 0

        def update(self, k):
            self.n += k
            if self.n in (5, self.total - 1):
                gc.collect()
                values = sum(t.numel() for t in gc.get_objects() if issubclass(type(t), torch.Tensor))
                alive.setdefault(self.total, []).append(values)

        def close(self):
            pass

    monkeypatch.setattr(ais_module, "tqdm", Probe)
    model, x = _ppca_data(3)
    for steps in (30, 300):
        ais(model.model, None, x, steps=steps, chains=4, leapfrog=1)
    assert alive[30][0] == alive[30][1] == alive[300][0] == alive[300][1], alive


# --- dgm eval -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    return train_tiny_vae(tmp_path_factory.mktemp("runs") / "vae")


@pytest.mark.parametrize("start", ["prior", "guide"])
def test_dgm_eval_runs_ais_with_its_settings(vae_run, start, capsys):
    args = ["--estimator", "ais", "--steps", "5", "--chains", "2", "--leapfrog", "2", "--limit", "3"]
    assert main(["eval", str(vae_run), *args, "--ais-start", start]) == 0
    written = sorted(vae_run.glob(f"eval_ais_*{start}*_test_n3.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["settings"] == {"steps": 5, "chains": 2, "leapfrog": 2, "ais_start": start, "ais_schedule": "sigmoid"}
    assert result["n"] == 3 and math.isfinite(result["nll"]) and 0 <= result["accept_mean"] <= 1
    assert result["K"] is None and result["elbo"] is None and result["khat_mean"] is None
    assert ("active_units" in result) == (start == "guide")
    assert main(["eval", str(vae_run), "--estimator", "ais", "--steps", "0"]) == 2
    assert "--steps (AIS) must be an integer >= 1" in capsys.readouterr().err

"""Bidirectional Monte Carlo (``inference.bdmc``) against closed forms: the simulated pairs
are draws of PPCA's joint, forward and reverse AIS sandwich PPCA's exact log p(x), reverse
AIS with one step is the likelihood at the exact posterior sample, and the gap closes as
T grows (PPCA and a small VAE); ``dgm bdmc`` on a tiny trained run (float64 where exact,
fixed seeds)."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from experiments.cli import main
from inference.ais import ais
from inference.bdmc import bdmc, simulate
from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.sbn import SBN, SBNConfig
from models.latent.vae import VAE, VAEConfig
from tests.helpers import train_tiny_vae
from tests.test_ppca import make_model


def _mean_se(v: torch.Tensor):
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


# --- the simulation ------------------------------------------------------------------------------
def test_simulated_pairs_are_draws_of_the_ppca_joint(float64, one_thread):
    """x has PPCA's marginal N(mu, W W^T + sigma^2 I), z* its prior N(0, I), and the residual
    x - (W z* + mu) is N(0, sigma^2 I) and uncorrelated with z*: each x is paired with the z*
    that generated it. Every moment within 4.5 Monte Carlo standard errors (20,000 pairs)."""
    model = make_model()
    torch.manual_seed(0)
    n = 20_000
    sim = simulate(model, n)
    assert sim.observed == "x" and set(sim.latents) == {"z"} and sim.x.shape == (n, 6)
    x, z = sim.x, sim.latents["z"]
    W, mu, s2 = model.W.detach(), model.mu.detach(), float(model.sigma2.detach())
    cov = W @ W.T + s2 * torch.eye(6)
    r = x - mu
    checks = []  # (values whose mean is tested, expected mean)
    for i in range(6):
        checks.append((x[:, i], float(mu[i])))
        for j in range(i, 6):
            checks.append((r[:, i] * r[:, j], float(cov[i, j])))
    e = x - z @ W.T - mu
    for i in range(6):
        checks.append((e[:, i] ** 2, s2))
        for j in range(2):
            checks.append((e[:, i] * z[:, j], 0.0))
    for j in range(2):
        checks += [(z[:, j], 0.0), (z[:, j] ** 2, 1.0)]
    for values, expected in checks:
        mean, se = _mean_se(values)
        assert abs(mean - expected) < 4.5 * se, (mean, expected, se)


class ReadsX(GenerativeModel):
    """z's prior depends on x itself: running it generatively does not draw from it."""

    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", dist.Normal(x.mean(-1), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1).expand(z.shape + x.shape[-1:]), 1.0).to_event(1), obs=x)


class NoLatents(GenerativeModel):
    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            pyro.sample("x", dist.Normal(torch.zeros_like(x), 1.0).to_event(1), obs=x)


@pytest.mark.parametrize(
    "model,message",
    [
        (SBN(DataSpec((4,), "binary"), SBNConfig(layers=(2,))), r"site 'h1' of SBN is discrete"),
        (ReadsX(DataSpec((3,), "real")), r"ReadsX reads x beyond observing it \(site 'z'"),
        (NoLatents(DataSpec((3,), "real")), r"NoLatents has no latent sites"),
    ],
)
def test_models_bdmc_cannot_simulate_from_are_refused(model, message):
    with pytest.raises(DGMError, match=message):
        bdmc(model, 3, steps=2, chains=2, leapfrog=1)


def test_bad_settings_are_refused_before_any_work(monkeypatch):
    import inference.bdmc as module

    monkeypatch.setattr(module, "simulate", lambda *a, **k: pytest.fail("simulated before checking"))
    model = make_model()
    for bad, flag in ((dict(n=0), "--n"), (dict(steps=0), "--steps"), (dict(chains=0), "--chains")):
        settings = dict(n=2, steps=2, chains=2, leapfrog=1) | bad
        with pytest.raises(DGMError, match=f"^{flag} must be an integer >= 1, got 0$"):
            bdmc(model, **settings)
    with pytest.raises(DGMError, match="reverse AIS starts from exact posterior samples"):
        ais(model.model, None, torch.zeros(2, 6), steps=2, chains=2, leapfrog=1, reverse=True)


# --- the bounds ----------------------------------------------------------------------------------
def test_reverse_ais_with_one_step_is_the_likelihood_at_the_exact_sample(float64):
    """T = 1: the reverse log-weight is (beta_0 - beta_1) f(z*) = -log p(x | z*) for every
    chain, so the upper estimate is log p(x | z*) = log N(x; W z* + mu, sigma^2 I) exactly
    (which is >= log p(x) in expectation over z* ~ p(z | x): by KL(posterior || prior))."""
    model = make_model()
    torch.manual_seed(1)
    sim = simulate(model, 7)
    z = sim.latents["z"]
    est = ais(model.model, None, sim.x, steps=1, chains=3, leapfrog=1, initial=sim.latents, reverse=True)
    expected = dist.Normal(z @ model.W.detach().T + model.mu.detach(), model.sigma2.detach().sqrt()).log_prob(sim.x)
    torch.testing.assert_close(est.log_px, expected.sum(-1), rtol=0, atol=1e-10)


def test_ppca_forward_and_reverse_ais_sandwich_the_exact_log_px(float64, one_thread):
    """On 40 points simulated from PPCA, the mean forward estimate is below the exact
    log p(x) and the mean reverse estimate above it (each within 3 standard errors across
    the datapoints), at T = 5 and T = 100, and the gap closes as T grows (measured: 8.3
    nats at T = 5, 1.6 at T = 100)."""
    model = make_model()
    torch.manual_seed(0)
    sim = simulate(model, 40)
    exact = model.log_prob(sim.x).detach()
    gaps = {}
    for steps in (5, 100):
        torch.manual_seed(steps)
        result = bdmc(model, simulation=sim, steps=steps, chains=8, leapfrog=5)
        below, se_below = _mean_se(result.lower - exact)
        above, se_above = _mean_se(result.upper - exact)
        assert below <= 3 * se_below, (steps, below, se_below)
        assert above >= -3 * se_above, (steps, above, se_above)
        gaps[steps] = result.summary()["gap"]
        assert result.summary()["n"] == 40 and result.settings["steps"] == steps
        assert ((result.accept_forward > 0) & (result.accept_reverse > 0)).all()
    assert gaps[100] < 0.5 * gaps[5], gaps


def test_vae_gap_is_positive_on_average_and_closes_with_t(one_thread):
    """A small VAE (2 latents, 8 binary pixels) whose decoder weights are scaled x5, so the
    posterior is far from the prior: the mean gap is >= 0 (within 3 standard errors) and
    smaller at T = 200 than at T = 5 by more than 3 standard errors of the paired
    difference (measured: 1.05 nats at T = 5, 0.02 at T = 200)."""
    torch.manual_seed(0)
    model = VAE(DataSpec((8,), "binary"), VAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(5.0)
    torch.manual_seed(1)
    sim = simulate(model, 100)
    gaps = {}
    for steps in (5, 200):
        torch.manual_seed(steps)
        gaps[steps] = bdmc(model, simulation=sim, steps=steps, chains=8, leapfrog=5).gap
        mean, se = _mean_se(gaps[steps])
        assert mean >= -3 * se, (steps, mean, se)
    closed, se = _mean_se(gaps[5] - gaps[200])
    assert closed > 3 * se, (closed, se)


# --- dgm bdmc ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    return train_tiny_vae(tmp_path_factory.mktemp("runs") / "vae")


def test_dgm_bdmc_writes_its_result_and_records_the_gap_in_the_summary(vae_run, capsys):
    before = json.loads((vae_run / "summary.json").read_text())
    assert "bdmc" not in before
    args = ["bdmc", str(vae_run), "--n", "3", "--steps", "5", "--chains", "2", "--leapfrog", "2", "--no-progress"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("BDMC on 3 points simulated from the model: mean log p(x) lower ")
    assert "(T=5, C=2, L=2, sigmoid, seed 0)" in line
    written = json.loads((vae_run / "bdmc_T5_C2_n3.json").read_text())
    assert {key: written[key] for key in ("steps", "chains", "leapfrog", "n", "seed")} == dict(
        steps=5, chains=2, leapfrog=2, n=3, seed=0
    )
    per = written["per_datapoint"]
    assert all(len(per[key]) == 3 for key in ("lower", "upper", "gap", "accept_forward", "accept_reverse"))
    for key in ("lower", "upper", "gap"):
        assert math.isclose(written[key], sum(per[key]) / 3, rel_tol=1e-9)
    assert all(math.isclose(g, u - lo, abs_tol=1e-9) for g, u, lo in zip(per["gap"], per["upper"], per["lower"]))
    after = json.loads((vae_run / "summary.json").read_text())
    assert after["bdmc"] == {
        **{key: written[key] for key in ("steps", "chains", "leapfrog", "schedule", "seed", "n")},
        **{key: written[key] for key in ("gap", "gap_stderr", "lower", "upper")},
        "file": "bdmc_T5_C2_n3.json",
    }
    assert {key: after[key] for key in before} == before  # nothing else changed
    assert main(args) == 0  # seeded: the same numbers again
    assert json.loads((vae_run / "bdmc_T5_C2_n3.json").read_text()) == written


@pytest.mark.parametrize("flag", ["--n", "--steps", "--chains", "--leapfrog"])
def test_dgm_bdmc_refuses_bad_arguments_in_one_line(vae_run, capsys, monkeypatch, flag):
    import experiments.runs

    monkeypatch.setattr(experiments.runs, "load_run", lambda *a, **k: pytest.fail("loaded the run before checking"))
    assert main(["bdmc", str(vae_run), flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dgm: error: {flag} must be an integer >= 1, got 0"
    assert not list(vae_run.glob("bdmc_*_n0.json"))

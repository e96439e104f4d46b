"""EM (``inference.em``: ``run_em`` and the closed-form ``em`` objective): monotone
likelihood and posterior, stationary fixed points, the runner's EM steps and the CLI's,
and its refusals (float64, fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from experiments import data as datasets
from inference.config import ObjectiveConfig
from inference.em import run_em
from inference.objective import make_objective
from inference.runner import Runner, TrainConfig
from models.base import DataError, DGMError
from models.latent.bernoulli_mixture import BernoulliMixture, BernoulliMixtureConfig
from tests.test_mixtures import MIXTURES, bernoulli_mixture, gaussian_mixture
from tests.test_ppca import D, make_model


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


# --- refusals ---------------------------------------------------------------------------------


def test_run_em_needs_em_update():
    class NoEM:
        def log_prob(self, x):
            return x.sum(-1)

    with pytest.raises(DGMError, match="em_update"):
        run_em(NoEM(), torch.zeros(3, 2, dtype=torch.float64))


def test_run_em_checks_data():
    model = make_model()
    with pytest.raises(DGMError):
        run_em(model, torch.zeros(4, D + 1, dtype=torch.float64), progress=False)

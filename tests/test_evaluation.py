"""Held-out evaluation (``inference.evaluation.evaluate``) against PPCA's exact log p(x):
the guide it is given, the rows it evaluates, and what each estimator reports (float64)."""

from __future__ import annotations

import pytest
import torch

from inference.config import EvalConfig
from inference.evaluation import evaluate
from inference.guides import Guide
from tests.test_ppca import Q, make_model


class _ExactPosterior(Guide):
    """PPCA's exact posterior p(z | x) as a guide (``model.exact_posterior_guide``)."""

    def __init__(self, model):
        super().__init__()
        self._program = model.exact_posterior_guide

    def forward(self, *args, **kwargs):
        return self._program(*args, **kwargs)


def test_evaluate_with_the_exact_posterior_guide_is_the_exact_nll(float64):
    """With q = p(z | x) every importance weight is p(x): the IS estimate with K = 10 is the
    exact NLL. The model's own encoder is left random, so evaluating any other guide than
    the one passed would miss it."""
    model = make_model()
    x = model.sample(40, generator=torch.Generator().manual_seed(8))
    exact = -model.log_prob(x).mean().item()
    guide = _ExactPosterior(model)
    out = evaluate(model, guide, x, EvalConfig(estimator="is", k=10))
    assert out["estimator"] == "is" and out["n"] == 40
    assert out["nll"] == pytest.approx(exact, abs=1e-6)
    assert out["active_units"] == Q  # both posterior means vary with x
    amortized = evaluate(model, None, x, EvalConfig(estimator="is", k=10))  # the random encoder
    assert amortized["nll"] > exact + 1e-3

    limited = evaluate(model, guide, x, EvalConfig(estimator="is", k=10, limit=3))
    assert limited["n"] == 3
    assert limited["nll"] == pytest.approx(-model.log_prob(x[:3]).mean().item(), abs=1e-6)

    by_formula = evaluate(model, guide, x, EvalConfig(estimator="exact"))
    assert by_formula["estimator"] == "exact" and "active_units" not in by_formula
    assert by_formula["nll"] == pytest.approx(exact, abs=1e-12)


def test_each_estimator_reports_only_the_fields_that_mean_something_for_it(float64):
    """Exact: no K, no sampling diagnostics, no ELBO; naive: K and diagnostics but no ELBO
    (its mean log-weight is the log-likelihood under prior draws); is: everything."""
    model = make_model()
    x = model.sample(6)
    exact = evaluate(model, None, x, EvalConfig(estimator="exact"))
    naive = evaluate(model, None, x, EvalConfig(estimator="naive", k=20))
    imp = evaluate(model, _ExactPosterior(model), x, EvalConfig(estimator="is", k=20))
    assert exact["K"] is None and exact["elbo"] is None and exact["khat_mean"] is None and exact["settings"] == {}
    assert naive["K"] == 20 and naive["elbo"] is None and naive["ess_mean"] is not None
    assert "active_units" not in naive and "active_units" in imp
    assert imp["K"] == 20 and imp["elbo"] == pytest.approx(imp["nll"] * -1, abs=1e-6)


def test_an_is_estimate_with_k_hat_above_0_7_on_most_points_says_so():
    from inference.evaluation import trust_warning

    khat = ["khat_frac_above_0.7"]
    assert trust_warning({"trust": khat, "khat_frac_above_0.7": 0.92}).startswith("PSIS k-hat > 0.7 on 92%")
    assert "--estimator ais" in trust_warning({"trust": khat, "khat_frac_above_0.7": 0.6})
    assert trust_warning({"trust": khat, "khat_frac_above_0.7": 0.3}) is None
    assert trust_warning({"trust": [], "khat_frac_above_0.7": None}) is None
    assert trust_warning({"trust": [], "khat_frac_above_0.7": 0.9}) is None  # naive: k-hat is not its trust figure

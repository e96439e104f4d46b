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

"""The score-function terms of the plain ``elbo`` and ``iwae`` on non-reparameterizable
sites, against exact gradients by enumeration; the ``average`` baseline's first step."""

import math

import pyro
import pytest
import torch

from inference.objectives import ELBO, IWAE, ScoreFunctionELBO
from tests.objective_cases import BitsCopies, GaussCopies, assert_unbiased, bits_gradient, estimates

N = 20000


@pytest.mark.parametrize(
    "objective,k,fn",
    [
        (ELBO, 1, lambda lw, lq, lp: lw[..., 0]),
        (ELBO, 3, lambda lw, lq, lp: lw.mean(-1)),
        (IWAE, 3, lambda lw, lq, lp: torch.logsumexp(lw, -1) - math.log(lw.shape[-1])),
    ],
    ids=["elbo-k1", "elbo-k3", "iwae-k3"],
)
def test_bernoulli_latent_gradients_equal_enumeration(float64, one_thread, objective, k, fn):
    """Bernoulli guide (no rsample): the mean of 20,000 independent estimates is the exact
    gradient of E[bound] (every K-tuple enumerated) for the guide's logits and the model's
    parameters; the guide's exact gradient is far from zero, so a missing score term fails."""
    m = BitsCopies(N)
    exact = bits_gradient(m, k, fn)
    pyro.set_rng_seed(0)
    est = estimates(m, objective(k).differentiable_loss(m.model, m.guide, m.data), m.names)
    assert_unbiased(est, exact)
    assert exact["phi"].abs().min() > 5 * est["phi"].std(0).max() / math.sqrt(N)


def test_average_baseline_first_step_keeps_the_learning_signal(float64):
    """One datapoint, one sample (B K = 1): with no earlier steps there is no average to
    subtract, so the first step's guide gradient is the baseline-free one (not zero, which
    subtracting the batch's own mean gave); the second step subtracts the first's signal."""
    grads = {}
    for name, decay in (("average", 0.9), ("none", None)):
        g = GaussCopies(1)
        objective = ScoreFunctionELBO(1, decay=decay)
        pyro.set_rng_seed(0)
        first = estimates(g, objective.differentiable_loss(g.model, g.guide, g.data), ("m", "s"))
        grads[name] = torch.cat([first["m"], first["s"]])
        if decay is not None:
            assert objective.average is not None
            signal = objective.average.clone()
            pyro.set_rng_seed(1)
            lw = objective.log_weights(g.model, g.guide, g.data)
            torch.testing.assert_close(objective.learning_signal(lw, lw.log_w[0]), lw.log_w.detach() - signal)
    assert grads["average"].abs().min() > 1e-3
    torch.testing.assert_close(grads["average"], grads["none"], rtol=0, atol=0)

"""Reweighted wake-sleep: wake-theta is IWAE's model gradient, wake-phi the self-normalized
inclusive-KL gradient, whose fixed point is the exact posterior."""

import math

import pyro
import torch

from inference.objectives import IWAE
from inference.rws import RWS
from tests.objective_cases import BitsCopies, assert_unbiased, bits_gradient, bits_tables, estimates

N = 20000


def wake(lw, lq, lp):
    """``sum_k stop(w~_k) (log p(x, z_k) + log q(z_k))``: its gradient, with the sampling
    probabilities held fixed, is the expected wake update (theta: log p, phi: log q)."""
    w = torch.softmax(lw.detach(), -1)
    return (w * (lp + lq)).sum(-1)


def factorized(n):
    """Two bits, two pixels, pixel d seeing bit d only: p(h | x) factorizes, so the
    mean-field guide holds the exact posterior."""
    m = BitsCopies(n, bits=2, pixels=2, x=torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        m.W.mul_(torch.eye(2))
    return m


def set_posterior(m):
    """phi = the exact posterior logits, bit by bit (they factorize)."""
    log_p, _ = bits_tables(m.row(0), m.data[0])
    hs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    post = (log_p - torch.logsumexp(log_p, 0)).exp()
    marginal = (post.unsqueeze(-1) * hs).sum(0)
    with torch.no_grad():
        m.phi.copy_(torch.logit(marginal).expand_as(m.phi))


def test_wake_updates_are_unbiased_against_enumeration(float64, one_thread):
    """K = 3: the mean of 20,000 independent estimates equals the expected wake-theta and
    wake-phi updates, every triple of configurations enumerated."""
    m = BitsCopies(N)
    pyro.set_rng_seed(0)
    est = estimates(m, RWS(3).differentiable_loss(m.model, m.guide, m.data), m.names)
    exact = bits_gradient(m, 3, wake, score=False)
    assert_unbiased(est, exact)
    assert exact["phi"].abs().min() > 10 * est["phi"].std(0).max() / math.sqrt(N)


def test_wake_phi_fixed_point_is_the_exact_posterior(float64, one_thread):
    """At q = p(h | x) every normalized weight is 1/K: the expected wake-phi update is zero
    (exactly, by enumeration; within the standard error over 20,000 estimates). Away from
    it, the expected update points toward the posterior's logits, coordinate by coordinate."""
    m = factorized(N)
    set_posterior(m)
    target = m.phi[0].detach().clone()
    for k in (1, 3):
        assert bits_gradient(m, k, wake, score=False)["phi"].abs().max() < 1e-12
    pyro.set_rng_seed(0)
    est = estimates(m, RWS(3).differentiable_loss(m.model, m.guide, m.data), ("phi",))
    assert_unbiased(est, {"phi": torch.zeros(2)})
    with torch.no_grad():
        m.phi.copy_((target + torch.tensor([1.5, -2.0])).expand_as(m.phi))
    step = bits_gradient(m, 3, wake, score=False)["phi"]
    assert (torch.sign(step) == torch.sign(target - m.phi[0])).all()


def test_wake_theta_is_iwae_model_gradient_from_the_same_samples(float64):
    out = []
    for objective in (RWS(4), IWAE(4)):
        m = BitsCopies(30)
        pyro.set_rng_seed(7)
        loss = objective.differentiable_loss(m.model, m.guide, m.data)
        out.append((loss.item(), estimates(m, loss, m.names)))
    assert out[0][0] == out[1][0]
    for name in ("prior_logits", "W", "b"):
        torch.testing.assert_close(out[0][1][name], out[1][1][name], rtol=1e-10, atol=1e-12)

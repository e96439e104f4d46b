"""PPCA against independent closed forms: it is the ground truth for every estimator test,
so every test here checks mathematics, in float64, with fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from inference.em import run_em
from models.base import DataSpec, DGMError
from models.latent.ppca import PPCA, PPCAConfig

D, Q = 6, 2
SIGMA2_TRUE = 0.3


@pytest.fixture(autouse=True)
def _seed_and_reset():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _rotation(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    qr, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return qr


def make_model(seed: int = 1, d: int = D, q: int = Q, sigma2: float = SIGMA2_TRUE) -> PPCA:
    """A PPCA with well separated singular values of W and a non-zero mean."""
    torch.manual_seed(seed)
    model = PPCA(DataSpec((d,), "real"), PPCAConfig(latent_dim=q)).double()
    g = torch.Generator().manual_seed(seed)
    W = _rotation(d, seed)[:, :q] * torch.linspace(3.0, 1.5, q, dtype=torch.float64)
    W = W @ _rotation(q, seed + 1)  # a non-trivial rotation of the latent space
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    model.set_params(W, mu, sigma2)
    return model


def mean_log_lik(W, mu, sigma2, x) -> float:
    """Mean log N(x; mu, W W^T + sigma2 I), computed with numpy alone."""
    W, mu, x = (np.asarray(a.detach(), dtype=np.float64) for a in (W, mu, x))
    C = W @ W.T + float(torch.as_tensor(sigma2).detach()) * np.eye(W.shape[0])
    r = x - mu
    _, logdet = np.linalg.slogdet(C)
    maha = np.einsum("nd,nd->n", r, np.linalg.solve(C, r.T).T)
    return float(np.mean(-0.5 * (W.shape[0] * math.log(2 * math.pi) + logdet + maha)))


def log_normal_std(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * math.log(2 * math.pi))


# --- log p(x) and p(z | x) -------------------------------------------------------------
@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


def test_log_prob_matches_numpyro(jax_x64):
    import jax.numpy as jnp
    import numpyro.distributions as ndist

    model = make_model()
    x = model.sample(50, generator=torch.Generator().manual_seed(2))
    x[:5] *= 3.0  # points in the tails too
    W, mu, s2 = (t.detach().numpy() for t in (model.W, model.mu, model.sigma2))
    C = jnp.asarray(W @ W.T + s2 * np.eye(D))
    expected = np.asarray(
        ndist.MultivariateNormal(jnp.asarray(mu), covariance_matrix=C).log_prob(jnp.asarray(x.numpy()))
    )
    assert expected.dtype == np.float64
    got = model.log_prob(x)
    assert got.shape == (50,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=0, atol=1e-8)


def test_log_prob_bayes_rule_identity():
    """log p(x) = log p(x, z) - log p(z | x) for every z: checks log_prob and posterior together."""
    model = make_model()
    x = model.sample(20, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    lp = model.log_prob(x)
    post = model.posterior(x)
    for _ in range(5):  # arbitrary z, not posterior draws
        z = 2.0 * torch.randn(20, Q, generator=g, dtype=torch.float64)
        loc = z @ model.W.T + model.mu
        log_lik = torch.distributions.Normal(loc, model.sigma2.sqrt()).log_prob(x).sum(-1)
        log_joint = log_normal_std(z) + log_lik
        torch.testing.assert_close(log_joint - post.log_prob(z), lp, rtol=0, atol=1e-8)


def test_posterior_matches_gaussian_conditioning():
    """p(z | x) from the joint (z, x): Cov(z, x) = W^T, Cov(x) = W W^T + sigma^2 I."""
    model = make_model()
    x = model.sample(10, generator=torch.Generator().manual_seed(5))
    W, mu, s2 = (t.detach().numpy() for t in (model.W, model.mu, model.sigma2))
    Sxx = W @ W.T + s2 * np.eye(D)
    Szx = W.T
    mean = (Szx @ np.linalg.solve(Sxx, (x.numpy() - mu).T)).T
    cov = np.eye(Q) - Szx @ np.linalg.solve(Sxx, Szx.T)
    post = model.posterior(x)
    assert post.batch_shape == (10,) and post.event_shape == (Q,)
    np.testing.assert_allclose(post.loc.detach().numpy(), mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        post.covariance_matrix.detach().numpy(),
        np.broadcast_to(cov, (10, Q, Q)),
        rtol=0,
        atol=1e-12,
    )


def test_exact_posterior_guide_gives_zero_variance_weights():
    """Trace the exact guide, replay the model: log p(x, z) - log q(z | x) = log p(x), every z."""
    model = make_model()
    x = model.sample(30, generator=torch.Generator().manual_seed(6))
    K = 7
    with pyro.plate("particles", K, dim=-2):
        guide_tr = poutine.trace(model.exact_posterior_guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    assert guide_tr.nodes["z"]["value"].shape == (K, 30, Q)
    log_w = model_tr.nodes["z"]["log_prob"] + model_tr.nodes["x"]["log_prob"] - guide_tr.nodes["z"]["log_prob"]
    assert log_w.shape == (K, 30)
    torch.testing.assert_close(log_w, model.log_prob(x).expand(K, 30), rtol=0, atol=1e-8)
    assert guide_tr.nodes["z"]["value"].std(0).min() > 0  # the z really differ


# --- maximum likelihood --------------------------------------------------------------
@pytest.fixture(scope="module")
def ppca_data():
    true = make_model(seed=11)
    x = true.sample(2000, generator=torch.Generator().manual_seed(12))
    return true, x


def test_em_is_monotone_and_reaches_the_mle(ppca_data):
    _, x = ppca_data
    torch.manual_seed(13)
    model = PPCA(DataSpec((D,), "real"), PPCAConfig(latent_dim=Q, init_scale=0.5)).double()
    steps_seen = []
    history = run_em(model, x, steps=5000, tol=1e-15, callback=lambda s, v: steps_seen.append(s), progress=False)
    assert steps_seen == list(range(1, len(history)))
    assert len(history) < 5001, "EM did not converge"
    diffs = np.diff(history)
    assert diffs.min() >= -1e-10, f"EM decreased the log-likelihood by {-diffs.min():g}"
    assert history[-1] - history[0] > 1.0

    W_ml, mu_ml, s2_ml = PPCA.mle(x, Q)
    assert abs(history[-1] - mean_log_lik(W_ml, mu_ml, s2_ml, x)) < 1e-6
    assert abs(history[-1] - float(model.log_prob(x).detach().mean())) < 1e-12
    torch.testing.assert_close(model.sigma2.detach(), s2_ml, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.mu.detach(), mu_ml, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.W @ model.W.T, W_ml @ W_ml.T, rtol=0, atol=1e-5)


def test_em_update_equals_explicit_e_and_m_steps(ppca_data):
    """The collapsed update (eqs. 29-30) equals an explicit E-step and M-step:
    E-step <z_n>, <z_n z_n^T>; M-step W = (sum x_n <z_n>^T)(sum <z_n z_n^T>)^{-1}, and
    sigma^2 = 1/(N D) sum ||x_n||^2 - 2 <z_n>^T W^T x_n + tr(<z_n z_n^T> W^T W), x centred."""
    _, x = ppca_data
    model = make_model(seed=21)  # parameters far from the MLE of this data
    W0, s20 = model.W.detach().numpy().copy(), float(model.sigma2.detach())
    xc = (x - x.mean(0)).numpy()
    N = xc.shape[0]
    M = W0.T @ W0 + s20 * np.eye(Q)
    Minv = np.linalg.inv(M)
    Ez = xc @ W0 @ Minv  # rows <z_n> = M^{-1} W^T (x_n - mean)
    sum_Ezz = N * s20 * Minv + Ez.T @ Ez
    W1 = (xc.T @ Ez) @ np.linalg.inv(sum_Ezz)
    s21 = (np.sum(xc**2) - 2 * np.sum(Ez * (xc @ W1)) + np.trace(sum_Ezz @ W1.T @ W1)) / (N * D)

    model.em_update(x)
    np.testing.assert_allclose(model.W.detach().numpy(), W1, rtol=0, atol=1e-10)
    np.testing.assert_allclose(float(model.sigma2.detach()), s21, rtol=1e-10)
    np.testing.assert_allclose(model.mu.detach().numpy(), x.mean(0).numpy(), rtol=0, atol=1e-14)


def test_mle_is_a_maximum(ppca_data):
    true, x = ppca_data
    W_ml, mu_ml, s2_ml = PPCA.mle(x, Q)
    assert W_ml.shape == (D, Q) and mu_ml.shape == (D,) and s2_ml.shape == ()
    best = mean_log_lik(W_ml, mu_ml, s2_ml, x)
    assert best >= mean_log_lik(true.W, true.mu, true.sigma2, x)

    g = torch.Generator().manual_seed(31)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(10):
            W = W_ml + scale * torch.randn(D, Q, generator=g, dtype=torch.float64)
            mu = mu_ml + scale * torch.randn(D, generator=g, dtype=torch.float64)
            s2 = s2_ml * math.exp(scale * float(torch.randn((), generator=g, dtype=torch.float64)))
            assert mean_log_lik(W, mu, s2, x) <= best
    # any rotation of W_ml is an MLE too
    R = _rotation(Q, 32)
    assert abs(mean_log_lik(W_ml @ R, mu_ml, s2_ml, x) - best) < 1e-12

    # stationarity: the gradient of the mean log-likelihood vanishes at the MLE
    model = make_model()
    model.set_params(W_ml, mu_ml, s2_ml)
    model.log_prob(x).mean().backward()
    for p in (model.W, model.mu, model.log_sigma):
        assert p.grad.abs().max() < 1e-10
    assert abs(float(model.log_prob(x).detach().mean()) - best) < 1e-10


def test_sample_covariance():
    model = make_model()
    n = 200_000
    x = model.sample(n, generator=torch.Generator().manual_seed(41))
    assert x.shape == (n, D) and x.dtype == torch.float64
    C = (model.W @ model.W.T + model.sigma2 * torch.eye(D, dtype=torch.float64)).detach()
    emp = torch.cov(x.T, correction=0)
    # Var of a Gaussian sample covariance entry: (C_ii C_jj + C_ij^2) / n
    se = ((torch.outer(C.diagonal(), C.diagonal()) + C**2) / n).sqrt()
    assert ((emp - C).abs() / se).max() < 5.0
    mean_se = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - model.mu.detach()).abs() / mean_se).max() < 5.0


@pytest.mark.parametrize(
    "spec, config",
    [
        (DataSpec((D,), "binary"), PPCAConfig()),
        (DataSpec((D,), "categorical", num_levels=4), PPCAConfig()),
        (DataSpec((2, 3), "real"), PPCAConfig()),
        (DataSpec((D,), "real"), PPCAConfig(latent_dim=D)),
        (DataSpec((D,), "real"), PPCAConfig(latent_dim=0)),
    ],
)
def test_bad_specs_are_rejected(spec, config):
    with pytest.raises(DGMError):
        PPCA(spec, config)


# --- Pyro ELBOs ---------------------------------------------------------------------
def test_trace_elbo_with_exact_guide_is_tight():
    model = make_model()
    x = model.sample(40, generator=torch.Generator().manual_seed(51))
    pyro_model, _ = model.svi_pair()
    total = float(model.log_prob(x).detach().sum())

    loss = Trace_ELBO().loss(pyro_model, model.exact_posterior_guide, x)
    assert abs(loss + total) < 1e-8 * abs(total)

    vec = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    assert abs(vec.loss(pyro_model, model.exact_posterior_guide, x) + total) < 1e-8 * abs(total)

    # a minibatch is scaled up to the dataset size by the data plate
    idx = torch.tensor([3, 7, 11, 19, 23])
    size = 40
    mb_loss = Trace_ELBO().loss(pyro_model, model.exact_posterior_guide, x[idx], idx=idx, size=size)
    expected = -(size / len(idx)) * float(model.log_prob(x[idx]).detach().sum())
    assert abs(mb_loss - expected) < 1e-8 * abs(expected)


def test_linear_encoder_family_contains_the_posterior():
    """The default guide set to (A, b, L) = posterior_affine() is the exact posterior."""
    model = make_model()
    x = model.sample(25, generator=torch.Generator().manual_seed(61))
    model.encoder.set_affine(*model.posterior_affine())
    loc, scale_tril = model.encoder(x)
    post = model.posterior(x)
    torch.testing.assert_close(loc, post.loc, rtol=0, atol=1e-12)
    torch.testing.assert_close(scale_tril @ scale_tril.T, post.covariance_matrix[0], rtol=0, atol=1e-12)

    pyro_model, pyro_guide = model.svi_pair()
    total = float(model.log_prob(x).detach().sum())
    loss = Trace_ELBO(num_particles=3).loss(pyro_model, pyro_guide, x)
    assert abs(loss + total) < 1e-8 * abs(total)


def test_default_guide_elbo_is_a_lower_bound_with_gradients():
    """With a random encoder the ELBO is strictly below log p(x) and gradients reach
    both the decoder and the encoder parameters through SVI's param store."""
    model = make_model()
    x = model.sample(25, generator=torch.Generator().manual_seed(71))
    pyro_model, pyro_guide = model.svi_pair()
    elbo = Trace_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(pyro_model, pyro_guide, x)
    assert float(loss.detach()) > -float(model.log_prob(x).detach().sum()) + 1.0
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

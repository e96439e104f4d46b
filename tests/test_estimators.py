"""log p(x) estimators against PPCA's exact marginal likelihood and ArviZ's PSIS."""

import math

import arviz as az
import numpy as np
import pytest
import torch

from inference.estimators import Estimate, estimate_dataset, importance, pareto_khat, tail_size
from models.base import DataSpec, DGMError
from models.latent.ppca import PPCA, PPCAConfig
from models.latent.vae import VAE, VAEConfig


def ppca(d=4, q=2, seed=0, poor=True):
    torch.manual_seed(seed)
    m = PPCA(DataSpec((d,), "real"), PPCAConfig(latent_dim=q))
    m.set_params(torch.randn(d, q), torch.randn(d), 0.5)
    a, b, tril = m.posterior_affine()
    if poor:
        m.encoder.set_affine(0.7 * a, b + 0.3, 1.3 * tril)
    return m


def test_is_with_exact_posterior_is_exact_for_k1(float64):
    m = ppca(poor=False)
    x = m.sample(20)
    est = importance(m.model, m.exact_posterior_guide, x, num_samples=1)
    torch.testing.assert_close(est.log_px, m.log_prob(x), rtol=0, atol=1e-10)
    assert (est.stderr < 1e-6).all()


@pytest.mark.parametrize("method,k", [("naive", 200_000), ("is", 20_000)])
def test_sampling_estimators_converge_to_exact_within_3_stderr(float64, method, k):
    m = ppca()
    x = m.sample(6)
    exact = m.log_prob(x)
    est = estimate_dataset(m, x, method=method, num_samples=k, progress=False)
    err = (est.log_px - exact).abs()
    assert (err <= 3 * est.stderr + 1e-3).all(), (err, est.stderr)
    assert (est.stderr > 0).all()  # the poor proposal is not exact
    # Jensen: the K-sample ELBO (mean log-weight) is below log p(x)
    assert (est.elbo < exact).all()


def test_chunking_does_not_change_the_estimate_statistics(float64):
    """Streaming logsumexp over chunks: many small chunks and one big chunk draw different
    samples, but both must agree with the exact value within their standard errors."""
    m = ppca()
    x = m.sample(3)
    exact = m.log_prob(x)
    for chunk in (7, 5000):
        est = importance(m.model, m.guide, x, num_samples=5000, chunk_size=chunk)
        assert ((est.log_px - exact).abs() <= 4 * est.stderr + 1e-3).all()


def test_estimate_over_one_chunk_equals_logmeanexp_of_the_same_weights(float64):
    from inference.logweights import compute_log_weights

    m = ppca()
    x = m.sample(4)
    torch.manual_seed(5)
    est = importance(m.model, m.guide, x, num_samples=300, chunk_size=300)
    torch.manual_seed(5)
    lw = compute_log_weights(m.model, m.guide, (x,), num_particles=300).log_w.detach()
    torch.testing.assert_close(est.log_px, torch.logsumexp(lw, 0) - math.log(300))
    w = torch.softmax(lw, 0)
    torch.testing.assert_close(est.ess, 1.0 / (w**2).sum(0))
    torch.testing.assert_close(est.elbo, lw.mean(0))
    _, k_az = az.psislw(lw.T.numpy().copy(), normalize=False)
    torch.testing.assert_close(est.khat, torch.as_tensor(k_az))


@pytest.mark.parametrize("k", [100, 1000, 20_000])
def test_streaming_khat_equals_arviz_on_all_weights(k):
    rng = np.random.default_rng(k)
    lw = np.stack([rng.standard_t(df, size=k) * 3 for df in (1.5, 3.0, 30.0)])  # heavy to light tails
    with np.errstate(over="ignore"):
        _, k_az = az.psislw(lw.copy(), normalize=False)
    tail = torch.as_tensor(lw.T).topk(tail_size(k), dim=0).values
    np.testing.assert_allclose(pareto_khat(tail, k).numpy(), k_az, rtol=1e-10)


def test_float32_k_1e5_stays_finite_and_consistent():
    m = VAE(DataSpec((16,), "binary"), VAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)))
    x = torch.bernoulli(torch.full((2, 16), 0.5))
    big = importance(m.model, m.guide, x, num_samples=100_000)
    small = importance(m.model, m.guide, x, num_samples=10_000)
    assert torch.isfinite(big.log_px).all() and torch.isfinite(big.stderr).all()
    assert ((big.log_px - small.log_px).abs() < 4 * (big.stderr + small.stderr) + 1e-3).all()


def test_exact_estimator_needs_an_exact_model():
    m = VAE(DataSpec((4,), "binary"), VAEConfig(latent_dim=1, encoder_hidden=(3,), decoder_hidden=(3,)))
    with pytest.raises(DGMError, match="no exact log p"):
        estimate_dataset(m, torch.zeros(2, 4), method="exact")
    with pytest.raises(DGMError, match="unknown estimator"):
        estimate_dataset(m, torch.zeros(2, 4), method="no-such-estimator")


def test_estimate_summary_and_concatenation(float64):
    m = ppca()
    x = m.sample(10)
    est = estimate_dataset(m, x, method="exact", batch_size=3)
    assert isinstance(est, Estimate) and est.log_px.shape == (10,)
    torch.testing.assert_close(est.log_px, m.log_prob(x))
    s = est.summary()
    assert s["nll"] == pytest.approx(float(-m.log_prob(x).detach().mean()))

"""VAE2 (two stochastic layers) and the Gaussian decoders of VAE / VAE2, against closed forms
and numerical integration, in float64. Active units per layer are tested in ``test_diagnostics``."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from pyro import poutine

from inference.logweights import compute_log_weights
from models import MODELS
from models.base import DataSpec, DGMError
from models.latent.vae import VAE, VAEConfig
from models.latent.vae2 import VAE2, VAE2Config

TINY = VAE2Config(h1_dim=1, h2_dim=1, hidden1=(4,), hidden2=(4,))


def _tiny(d: int = 3, seed: int = 0) -> VAE2:
    torch.manual_seed(seed)
    return VAE2(DataSpec((d,), "binary"), TINY).double()


def _all_binary(d: int) -> torch.Tensor:
    return torch.tensor(list(product([0.0, 1.0], repeat=d)), dtype=torch.float64)


def _quadrature_log_px(model: VAE2, x: torch.Tensor) -> torch.Tensor:
    """``log p(x) = log int int N(h2; 0, 1) p(h1 | h2) p(x | h1) dh1 dh2`` by the trapezoid
    rule on a grid (1-D h1 and h2), independent of the model's Pyro program."""
    h2 = torch.linspace(-9, 9, 241, dtype=torch.float64)
    h1 = torch.linspace(-14, 14, 481, dtype=torch.float64)
    with torch.no_grad():
        log_p_h2 = torch.distributions.Normal(0.0, 1.0).log_prob(h2)  # [G2]
        p1 = model.p_h1(h2[:, None])  # batch [G2]
        log_p_h1 = p1.base_dist.log_prob(h1[:, None, None]).squeeze(-1)  # [G1, G2]
        logits = model.decoder(h1[:, None])  # [G1, D]
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits[None].expand(x.shape[0], -1, -1), x[:, None].expand(-1, h1.shape[0], -1), reduction="none"
        ).sum(-1)  # [N, G1]
        joint = (log_lik[:, :, None] + log_p_h1[None] + log_p_h2[None, None]).exp()  # [N, G1, G2]
        inner = torch.trapezoid(joint, h1, dim=1)
        return torch.trapezoid(inner, h2, dim=1).log()


def test_quadrature_of_the_two_layer_model_is_normalized_over_all_binary_x(float64):
    model = _tiny()
    x = _all_binary(3)
    total = _quadrature_log_px(model, x).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_importance_sampling_with_the_guide_converges_to_the_integral(float64):
    """log (1/K) sum_k w_k with the two-layer guide is a consistent estimator of log p(x);
    a guide or model that wired h1/h2 wrongly would converge elsewhere."""
    model = _tiny()
    for layer in (model.q_h1, model.q_h2):  # proposals of scale softplus(1) = 1.31: light-tailed weights
        with torch.no_grad():
            layer.net[-1].weight[1:].zero_()
            layer.net[-1].bias[1:] = 1.0
    x = _all_binary(3)
    truth = _quadrature_log_px(model, x)
    torch.manual_seed(1)
    k = 40000
    with torch.no_grad():
        lw = compute_log_weights(model.model, model.guide, (x,), num_particles=k, max_plate_nesting=1)
    estimate = torch.logsumexp(lw.log_w, 0) - math.log(k)
    w = (lw.log_w - lw.log_w.max(0).values).exp()
    stderr = w.std(0) / w.mean(0) / math.sqrt(k)  # delta method: sd of log of the mean weight
    assert (stderr < 0.01).all()
    assert ((estimate - truth).abs() < 4 * stderr).all(), (estimate - truth, stderr)


def test_ancestral_samples_follow_the_integrated_distribution(float64):
    model = _tiny(seed=2)
    x = _all_binary(3)
    probs = _quadrature_log_px(model, x).exp()
    torch.manual_seed(3)
    n = 200_000
    samples = model.sample(n)
    codes = (samples * torch.tensor([4.0, 2.0, 1.0], dtype=samples.dtype)).sum(-1).long()
    freq = torch.bincount(codes, minlength=8).double() / n
    stderr = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 5 * stderr + 1e-4).all(), (freq, probs)


def test_log_weight_is_the_two_layer_decomposition(float64):
    """log w = log p(x|h1) + log p(h1|h2) + log p(h2) - log q(h1|x) - log q(h2|h1) at the
    guide's samples, each term computed from the networks directly."""
    torch.manual_seed(0)
    model = VAE2(DataSpec((5,), "binary"), VAE2Config(h1_dim=3, h2_dim=2, hidden1=(6,), hidden2=(4,))).double()
    x = torch.bernoulli(torch.full((4, 5), 0.5, dtype=torch.float64))
    guide = poutine.trace(model.guide)  # keeps the trace compute_log_weights draws
    with torch.no_grad():
        lw = compute_log_weights(model.model, guide, (x,), num_particles=3, max_plate_nesting=1)
        guide_trace = guide.msngr.trace
        h1, h2 = guide_trace.nodes["h1"]["value"], guide_trace.nodes["h2"]["value"]
        normal = torch.distributions.Normal
        q1 = model.q_h1(x)
        log_q = q1.log_prob(h1) + model.q_h2(h1).log_prob(h2)
        log_p = normal(0.0, 1.0).log_prob(h2).sum(-1) + model.p_h1(h2).log_prob(h1)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            model.decoder(h1), x.expand(3, -1, -1), reduction="none"
        ).sum(-1)
    torch.testing.assert_close(lw.log_lik, log_lik)
    torch.testing.assert_close(lw.log_prior - lw.log_q, log_p - log_q)
    torch.testing.assert_close(lw.log_w, log_lik + log_p - log_q)


def test_iwae_2layer_preset_is_the_papers_architecture():
    model = VAE2(DataSpec((784,), "binary"), VAE2.presets["iwae-2layer"])

    def shapes(mlp):
        return [tuple(m.weight.shape[::-1]) for m in mlp if isinstance(m, torch.nn.Linear)]

    assert shapes(model.q_h1.net) == [(784, 200), (200, 200), (200, 200)]  # loc and scale of 100 units
    assert shapes(model.q_h2.net) == [(100, 100), (100, 100), (100, 100)]  # loc and scale of 50 units
    assert shapes(model.p_h1.net) == [(50, 100), (100, 100), (100, 200)]
    assert shapes(model.decoder) == [(100, 200), (200, 200), (200, 784)]
    assert all(isinstance(m, torch.nn.Tanh) for m in model.decoder if not isinstance(m, torch.nn.Linear))
    assert MODELS["vae2"] is VAE2 and "small" in VAE2.presets


def test_bad_config_is_a_dgm_error():
    with pytest.raises(DGMError, match="h1_dim"):
        VAE2(DataSpec((4,), "binary"), VAE2Config(h1_dim=0))
    with pytest.raises(DGMError, match="decoder scale"):
        VAE2(DataSpec((4,), "real"), VAE2Config(decoder_scale="per-galaxy"))


# --- Gaussian decoders ---------------------------------------------------------------------------
def _closed_form(x, mu, sigma):
    return (-0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


def _decoder_log_lik(model, x, z_site="z"):
    """log p(x | latents) of the model's observed site at latents drawn from the guide."""
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    site = model_trace.nodes["x"]
    return site["fn"].log_prob(x), guide_trace.nodes[z_site]["value"]


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_fixed_variance_decoder_is_the_closed_form_gaussian(float64, scale):
    torch.manual_seed(0)
    cfg = VAEConfig(latent_dim=3, encoder_hidden=(8,), decoder_hidden=(8,), gaussian_scale=scale, learn_scale=False)
    model = VAE(DataSpec((5,), "real"), cfg).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    log_lik, z = _decoder_log_lik(model, x)
    sigma = torch.full((5,), scale, dtype=torch.float64)
    torch.testing.assert_close(log_lik, _closed_form(x, model.decoder(z), sigma), rtol=1e-12, atol=1e-12)
    assert not any(p is model.likelihood.log_scale for p in model.parameters())  # fixed: not trained


def test_per_pixel_learned_variance_is_one_parameter_per_pixel(float64):
    torch.manual_seed(0)
    cfg = VAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), decoder_scale="per-pixel")
    model = VAE(DataSpec((2, 3), "real"), cfg).double()
    assert isinstance(model.likelihood.log_scale, torch.nn.Parameter)
    assert model.likelihood.log_scale.shape == (2, 3)
    with torch.no_grad():
        model.likelihood.log_scale.copy_(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3))
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    log_lik, z = _decoder_log_lik(model, x)
    expected = _closed_form(x.reshape(4, 6), model.decoder(z), model.likelihood.log_scale.exp().reshape(6))
    torch.testing.assert_close(log_lik, expected, rtol=1e-12, atol=1e-12)
    log_lik.sum().backward()
    grad = model.likelihood.log_scale.grad
    # d/d log sigma_d of sum_n log N(x_nd; mu, sigma_d) = sum_n ((x - mu)^2 / sigma_d^2 - 1): one per pixel
    sigma = model.likelihood.log_scale.detach().exp().reshape(6)
    resid = (x.reshape(4, 6) - model.decoder(z).detach()) ** 2 / sigma**2
    torch.testing.assert_close(grad.reshape(6), (resid - 1).sum(0))


def test_shared_and_per_datapoint_variances(float64):
    torch.manual_seed(0)
    shared = VAE(DataSpec((4,), "real"), VAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,))).double()
    assert shared.likelihood.log_scale.shape == () and isinstance(shared.likelihood.log_scale, torch.nn.Parameter)
    cfg = VAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), decoder_scale="per-datapoint")
    hetero = VAE(DataSpec((4,), "real"), cfg).double()
    assert hetero.decoder[-1].out_features == 8  # means and raw scales
    x = torch.randn(5, 4, dtype=torch.float64)
    log_lik, z = _decoder_log_lik(hetero, x)
    loc, raw = hetero.decoder(z).chunk(2, -1)
    sigma = torch.nn.functional.softplus(raw) + hetero.likelihood.min_scale
    torch.testing.assert_close(log_lik, _closed_form(x, loc, sigma), rtol=1e-12, atol=1e-12)
    with pytest.raises(DGMError, match="per-datapoint"):
        VAE(DataSpec((4,), "real"), VAEConfig(learn_scale=False, decoder_scale="per-datapoint"))


def test_two_layer_vae_takes_a_gaussian_decoder(float64):
    torch.manual_seed(0)
    cfg = VAE2Config(h1_dim=2, h2_dim=1, hidden1=(6,), hidden2=(4,), gaussian_scale=0.5, learn_scale=False)
    model = VAE2(DataSpec((3,), "real"), cfg).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    log_lik, h1 = _decoder_log_lik(model, x, "h1")
    torch.testing.assert_close(log_lik, _closed_form(x, model.decoder(h1), torch.full((3,), 0.5, dtype=x.dtype)))

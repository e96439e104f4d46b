"""The semi-amortized guide (``inference.semi_amortized``): the encoder's q(z | x) refined by
per-datapoint natural-gradient steps on the ELBO. Zero steps is the encoder's own q; the
refined q's held-out ELBO is at least the encoder's; the encoder is trained on the ELBO at its
own output (its gradient has the ELBO gradient's expectation) and the decoder on the refined q."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

from experiments.runs import load_run
from inference import GUIDES, build_guide
from inference.objectives import ELBO
from inference.semi_amortized import SemiAmortizedGuide
from models.base import DataSpec, DGMError, collect_aux_terms
from models.latent.sbn import SBN
from models.latent.vae import VAE, VAEConfig
from tests.helpers import train_tiny_vae


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return load_run(train_tiny_vae(tmp_path_factory.mktemp("sa") / "run"), device="cpu")


def test_zero_steps_is_the_encoders_own_q(tiny_run):
    model, x = tiny_run.model, tiny_run.data.test[:20]
    guide = build_guide("semi-amortized", model, x, refine_steps=0)
    assert isinstance(guide, SemiAmortizedGuide) and "semi-amortized" in GUIDES
    assert list(guide.parameters()) == []  # the encoder is the model's
    ours = poutine.trace(guide).get_trace(x).nodes["z"]["fn"].base_dist
    theirs = model.posterior(x)
    torch.testing.assert_close(ours.loc, theirs.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.scale, theirs.stddev, rtol=1e-5, atol=1e-6)


def test_the_refined_q_has_a_held_out_elbo_at_least_the_encoders(tiny_run, one_thread):
    model, x = tiny_run.model, tiny_run.data.test[:100]
    idx = torch.arange(len(x))
    guide = build_guide("semi-amortized", model, x, refine_steps=10, refine_lr=0.1)
    torch.manual_seed(0)
    with torch.no_grad():
        encoder = ELBO(200).bound(model.model, model.guide, x, idx, len(x))
        refined = ELBO(200).bound(model.model, guide, x, idx, len(x))
    gain = refined - encoder
    stderr = gain.std() / len(x) ** 0.5
    assert gain.mean() > 3 * stderr, (gain.mean(), stderr)  # a barely trained encoder: a clear gain
    assert (gain > -1.0).float().mean() > 0.9  # and per datapoint, up to Monte Carlo noise


def test_the_encoder_gradient_is_the_elbo_gradient_at_its_own_output_and_the_decoder_gets_none_of_it(one_thread):
    torch.manual_seed(0)
    model = VAE(DataSpec((6,), "binary"), VAEConfig(latent_dim=2, encoder_hidden=(5,), decoder_hidden=(5,)))
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    guide = SemiAmortizedGuide(model, x, steps=0)
    encoder = list(model.encoder.parameters())
    decoder = list(model.decoder.parameters())

    def grads(g, repeats):
        """The mean of ``repeats`` independent one-sample gradient estimates: ``x`` repeated
        ``repeats`` times in one batch gives every copy its own sample."""
        rows = x.repeat(repeats, 1)
        with collect_aux_terms(train=True) as extra:
            loss = ELBO(1).loss_terms(model.model, g, rows)[0]
        loss = (loss + sum(v.sum() for v in extra.losses.values())) / repeats
        return [
            d if d is not None else torch.zeros_like(p)
            for p, d in zip(encoder + decoder, torch.autograd.grad(loss, encoder + decoder, allow_unused=True))
        ]

    # only the auxiliary loss reaches the encoder: its value is 0, its gradient the ELBO's
    with collect_aux_terms(train=True) as extra:
        guide(x, torch.arange(4), 4)
    aux = extra.losses["encoder_elbo"]
    assert aux.shape == (4,) and torch.all(aux == 0)
    assert all(g is None for g in torch.autograd.grad(aux.sum(), decoder, allow_unused=True))
    torch.manual_seed(1)
    ours = grads(guide, 20000)
    torch.manual_seed(2)
    exact = grads(model.guide, 20000)  # the plain reparameterized ELBO gradient
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.05)


def test_a_model_without_gaussian_latents_is_refused():
    model = SBN(DataSpec((6,), "binary"))
    with pytest.raises(DGMError, match="semi-amortized guide refines diagonal Gaussian sites"):
        build_guide("semi-amortized", model, torch.zeros(3, 6))

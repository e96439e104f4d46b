"""Guides (``inference.guides``): the amortized guide is the model's encoder and holds
nothing of its own; the local guide holds one set of parameters per datapoint, indexed by
the dataset indices, and is refitted on held-out data with the model frozen; the registry
and its refusals."""

from __future__ import annotations

import re

import pyro
import pytest
import torch
from pyro import poutine

from experiments import data as datasets
from inference import GUIDES
from inference.guides import AmortizedGuide, Guide, LocalGuide, build_guide
from inference.objectives import ELBO
from inference.runner import Runner, TrainConfig, fit_local_guide
from models.base import DataSpec, DGMError
from models.latent.cvae import CVAE, CVAEConfig
from models.latent.vae import VAE, VAEConfig

N = 10


def _tiny_vae_and_data(n: int = N):
    torch.manual_seed(0)
    model = VAE(DataSpec((16,), "binary"), VAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)))
    x = torch.bernoulli(torch.full((n, 16), 0.5))
    return model, x


def test_the_amortized_guide_is_the_models_encoder_with_no_parameters_of_its_own():
    model, x = _tiny_vae_and_data()
    guide = build_guide("amortized", model, x)
    assert isinstance(guide, AmortizedGuide) and isinstance(guide, Guide)
    assert guide.is_model_guide and not guide.refit_on_new_data
    assert list(guide.parameters()) == [] and len(guide.state_dict()) == 0  # the encoder is the model's
    pyro.set_rng_seed(3)
    ours = poutine.trace(guide).get_trace(x)
    pyro.set_rng_seed(3)
    theirs = poutine.trace(model.guide).get_trace(x)
    q, want = ours.nodes["z"]["fn"].base_dist, theirs.nodes["z"]["fn"].base_dist
    torch.testing.assert_close(q.loc, want.loc, rtol=0, atol=0)
    torch.testing.assert_close(q.scale, want.scale, rtol=0, atol=0)
    torch.testing.assert_close(ours.nodes["z"]["value"], theirs.nodes["z"]["value"], rtol=0, atol=0)
    assert q.loc.std(0).min() > 0  # the encoder's q(z | x) differs between datapoints
    assert guide.for_data(model, x[:3]) is guide


def test_the_local_guide_has_one_row_per_datapoint_and_reads_the_rows_of_idx():
    model, x = _tiny_vae_and_data()
    guide = build_guide("local", model, x)
    assert isinstance(guide, LocalGuide) and guide.refit_on_new_data and not guide.is_model_guide
    assert guide.num_data == N
    assert dict(guide.named_parameters()).keys() == {"loc.z", "raw_scale.z"}
    assert guide.loc["z"].shape == (N, 2) and guide.raw_scale["z"].shape == (N, 2)
    loc = torch.arange(2.0 * N).reshape(N, 2)
    scale = 0.1 + torch.arange(2.0 * N).reshape(N, 2) / 100
    with torch.no_grad():
        guide.loc["z"].copy_(loc)
        guide.raw_scale["z"].copy_(scale.expm1().log())  # softplus^-1
    idx = torch.tensor([7, 2, 4])
    trace = poutine.trace(guide).get_trace(x[idx], idx, N)
    q = trace.nodes["z"]["fn"].base_dist
    torch.testing.assert_close(q.loc, loc[idx], rtol=0, atol=0)
    torch.testing.assert_close(q.scale, scale[idx], rtol=1e-6, atol=1e-5)  # + the 1e-5 floor
    frame = next(f for f in trace.nodes["z"]["cond_indep_stack"] if f.name == "data")
    assert (frame.size, frame.full_size) == (3, N) and trace.nodes["z"]["scale"] == N / 3
    with pytest.raises(DGMError, match="without dataset indices"):
        guide(x[:3])


def test_for_data_of_the_local_guide_fits_a_new_guide_on_the_new_rows_with_the_model_frozen():
    model, x = _tiny_vae_and_data()
    guide = build_guide("local", model, x, refit_epochs=3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    new_x = torch.bernoulli(torch.full((6, 16), 0.5))
    train = TrainConfig(batch_size=6, lr=1e-1, device="cpu", progress=False)
    fitted = guide.for_data(model, new_x, train=train)
    assert isinstance(fitted, LocalGuide) and fitted is not guide
    assert fitted.num_data == 6 and fitted.loc["z"].shape == (6, 2)
    assert guide.num_data == N  # the training guide is left as it was
    assert fitted.loc["z"].abs().min() > 0  # fitted: every row moved from its initial 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is unchanged
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_the_registry_lists_the_guides_and_refuses_unknown_names_with_the_choices():
    model, x = _tiny_vae_and_data()
    assert set(GUIDES) >= {"amortized", "local", "iaf", "planar", "radial"}
    assert set(GUIDES) >= {"auto-normal", "auto-lowrank-mvn", "auto-iaf"}
    choices = "choose from " + ", ".join(GUIDES.names())
    with pytest.raises(DGMError, match=re.escape(f"unknown guide 'amortised'; {choices}")):
        build_guide("amortised", model, x)


def test_a_labelled_model_is_refused_any_guide_but_its_own():
    data = datasets.load("digits")
    assert data.train_labels is not None
    model = CVAE(data.spec, CVAEConfig(latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)))
    x = data.train[:20]
    with pytest.raises(DGMError, match="use --guide amortized instead of local"):
        build_guide("local", model, x)
    assert isinstance(build_guide("amortized", model, x), AmortizedGuide)


def test_local_guide_on_held_out_data_beats_the_encoder():
    """The amortization gap is >= 0: per-datapoint q started at the encoder's output and
    fitted with the decoder frozen has a higher ELBO than the encoder (Cremer et al. 2018)."""
    data = datasets.load("digits")
    torch.manual_seed(0)
    m = VAE(data.spec, VAEConfig(latent_dim=8, encoder_hidden=(64,), decoder_hidden=(64,)))
    runner = Runner(m, data, ELBO(), config=TrainConfig(epochs=5, progress=False, validate=False))
    runner.fit()
    x = data.test[:100]
    cfg = TrainConfig(batch_size=100, lr=1e-2, progress=False)
    local = fit_local_guide(m, x, 10, cfg, epochs=100, init_from=m.guide)
    torch.manual_seed(1)
    elbo_amortized = ELBO(200).bound(m.model, m.guide, x, torch.arange(100), 100)
    elbo_local = ELBO(200).bound(m.model, local, x, torch.arange(100), 100)
    gap = (elbo_local - elbo_amortized).mean()
    assert gap > 0.05, gap  # about 0.17 nats here; the evaluation's MC error is about 0.02
    assert all(p.requires_grad for p in m.parameters())  # the model is unfrozen afterwards


@pytest.fixture(scope="module")
def small_vae():
    """A small VAE trained 5 epochs on digits with its encoder (the tests below leave it as it was)."""
    data = datasets.load("digits")
    torch.manual_seed(0)
    m = VAE(data.spec, VAEConfig(latent_dim=8, encoder_hidden=(64,), decoder_hidden=(64,)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    Runner(m, data, ELBO(), config=TrainConfig(epochs=5, progress=False, validate=False, device="cpu")).fit()
    torch.set_num_threads(threads)
    return m, data


def test_the_local_guide_refitted_with_its_defaults_has_a_held_out_elbo_at_least_the_encoders(small_vae, one_thread):
    """With its default learning rate, initial scale, refit epochs and per-minibatch steps,
    a local guide fitted from scratch on held-out data (the model frozen) reaches at least the
    encoder's ELBO: the amortization gap is >= 0, and the defaults get there."""
    m, data = small_vae
    x = data.test[:100]
    guide = build_guide("local", m, data.train)
    assert (guide.lr, guide.init_scale, guide.steps) == (0.1, 1.0, 5)
    local = guide.for_data(m, x, train=TrainConfig(progress=False, device="cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        encoder = ELBO(200).bound(m.model, m.guide, x, torch.arange(100), 100)
        fitted = ELBO(200).bound(m.model, local, x, torch.arange(100), 100)
    assert (fitted - encoder).mean() > 0, (fitted.mean(), encoder.mean())


def test_the_local_guides_minibatch_steps_raise_the_rows_elbo_and_touch_no_other_row(small_vae, one_thread):
    m, data = small_vae
    x = data.test[:50]
    guide = build_guide("local", m, x, local_steps=5)
    idx = torch.arange(10, 30)
    before = {name: p.detach().clone() for name, p in guide.named_parameters()}
    torch.manual_seed(2)
    with torch.no_grad():
        start = ELBO(500).bound(m.model, guide, x[idx], idx, 50)
    guide.before_step(m, x[idx], idx, 50, {})
    with torch.no_grad():
        end = ELBO(500).bound(m.model, guide, x[idx], idx, 50)
    assert (end - start).mean() > 1.0  # from q = N(0, 1): a large gain in five steps
    for name, p in guide.named_parameters():
        rest = torch.ones(50, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(p[rest], before[name][rest]) and not torch.equal(p[idx], before[name][idx])


def test_the_local_guides_parameters_get_its_own_learning_rate_under_the_schedule(small_vae):
    m, data = small_vae
    guide = build_guide("local", m, data.train, local_lr=0.05)
    runner = Runner(m, data, ELBO(), guide=guide, config=TrainConfig(lr=2e-3, progress=False, device="cpu"))
    groups = runner.optimizer.param_groups
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == {id(p) for p in guide.parameters()}
    runner._set_learning_rate(0, 10, 0)
    assert groups[0]["lr"] == 2e-3 and groups[1]["lr"] == pytest.approx(0.05)

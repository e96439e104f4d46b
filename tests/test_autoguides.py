"""Pyro's autoguides behind the guide interface (``inference.autoguides``) and the one-line
refusals of guides that cannot handle a site (float64 where values are compared).

* Every autoguide's ELBO equals Pyro's ``Trace_ELBO`` sample for sample (value and
  gradients) on a model with a global and a local latent under a subsampled data plate;
  AutoNormal's per-datapoint parameters get gradients only in the minibatch's rows.
* A PPCA trained with ``auto-normal``: importance sampling with the refitted guide
  approaches the exact log p(x).
* ``for_data`` keeps q(theta) (copied, frozen) and fits new per-datapoint parameters.
* Refusals name the site, its distribution and the guide to use: discrete sites, a
  ``MixtureSameFamily`` prior for the autoguides; a global site for the local guide; joint
  guides on a model without global latents. The local guide handles the mixture prior.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import EvalConfig, Runner, TrainConfig, build_guide, evaluate
from inference.objectives import ELBO, IWAE
from models.base import DataSpec, DGMError
from models.latent.gaussian_mixture import GaussianMixture, GaussianMixtureConfig
from models.latent.vae import VAE, VAEConfig
from tests.test_global_latents import OffsetPPCA, _data
from tests.test_ppca import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("auto-normal", "auto-lowrank-mvn", "auto-iaf")


@pytest.mark.parametrize("kind", KINDS)
def test_autoguide_elbo_equals_trace_elbo_with_global_and_local_latents_under_subsampling(float64, kind):
    model = OffsetPPCA()
    x = _data(model)
    guide = build_guide(kind, model, x)
    assert guide.refit_on_new_data and guide.describe() == kind
    idx, n = torch.tensor([3, 7, 9]), x.shape[0]
    params = [p for p in guide.parameters() if p.requires_grad] + list(model.parameters())
    for k in (1, 3):
        pyro.set_rng_seed(k)
        ours = ELBO(k).differentiable_loss(model.model, guide, x[idx], idx, n)
        ours_grads = torch.autograd.grad(ours, params, allow_unused=True)
        pyro.set_rng_seed(k)
        trace_elbo = pyro.infer.Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        ref = trace_elbo.differentiable_loss(model.model, guide, x[idx], idx, n)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        for g, r in zip(ours_grads, ref_grads):
            if r is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    local = dict(guide.named_parameters())[
        [n for n, _ in guide.named_parameters() if n.endswith("locs.z_unconstrained")][0]
    ]
    grad = torch.autograd.grad(ELBO(2).differentiable_loss(model.model, guide, x[idx], idx, n), local)[0]
    rows = grad.abs().sum(-1) > 0
    assert rows[idx].all() and rows.sum() == len(idx)  # per datapoint: only the minibatch's rows move
    # IWAE shares one global draw across its particles (finite, and K = 1 is the ELBO)
    pyro.set_rng_seed(0)
    one = IWAE(1).differentiable_loss(model.model, guide, x[idx], idx, n)
    pyro.set_rng_seed(0)
    torch.testing.assert_close(one, ELBO(1).differentiable_loss(model.model, guide, x[idx], idx, n))


def test_for_data_keeps_the_global_guide_and_fits_new_per_datapoint_parameters(float64):
    model = OffsetPPCA()
    x = _data(model)
    guide = build_guide("auto-lowrank-mvn", model, x)
    fresh = guide.for_data(model, x[:5], train=TrainConfig(progress=False, lr=1e-2))
    before, after = dict(guide.named_parameters()), dict(fresh.named_parameters())
    for name, p in after.items():
        if ".locs." in name or ".scales." in name:
            assert p.shape[0] == 5 and p.requires_grad  # the held-out rows' own parameters
        else:
            torch.testing.assert_close(p, before[name])  # q(theta) as trained, frozen
            assert not p.requires_grad
    assert all(p.requires_grad for p in model.parameters())  # the model is unfrozen after the fit


def test_auto_normal_trains_ppca_and_importance_sampling_approaches_exact_log_px():
    """The model and an AutoNormal guide trained together on PPCA data; on held-out data the
    guide is refitted and IS with K = 2000 gets within 0.02 nats of the exact log p(x),
    above the guide's own ELBO."""
    torch.manual_seed(0)
    truth = make_model()
    g = torch.Generator().manual_seed(5)
    train, test = truth.sample(600, generator=g), truth.sample(50, generator=g)

    class Data:
        dynamic = False

        def __init__(self):
            self.train, self.val, self.test = train, None, test

        def train_epoch(self, generator):
            return self.train

    model = make_model(seed=3)
    config = TrainConfig(epochs=30, batch_size=100, lr=5e-2, device="cpu", progress=False, validate=False)
    runner = Runner(model, Data(), ELBO(1), guide="auto-normal", config=config, guide_options={"refit_epochs": 300})
    runner.fit()
    result = evaluate(model, runner.guide, test, EvalConfig(estimator="is", k=2000), train=config)
    with torch.no_grad():
        exact = float(model.log_prob(test).double().mean())
    assert abs(-result["nll"] - exact) < 0.02, (result["nll"], exact)
    assert result["nll"] < -result["elbo"]  # IS with K = 2000 is tighter than the guide's ELBO


# --- refusals that name the site, the distribution and the guide to use ------------------------------
class MixturePriorVAE(VAE):
    """A VAE whose prior on z is a mixture of Gaussians (MixtureSameFamily)."""

    def prior(self, like):
        mix = dist.Categorical(logits=like.new_zeros(3))
        comp = dist.Normal(torch.arange(3.0).unsqueeze(-1).expand(3, self.config.latent_dim), 1.0).to_event(1)
        return dist.MixtureSameFamily(mix, comp)


def _mixture_vae():
    return MixturePriorVAE(DataSpec((5,), "binary"), VAEConfig(latent_dim=2, encoder_hidden=(4,), decoder_hidden=(4,)))


@pytest.mark.parametrize("kind", KINDS)
def test_autoguides_refuse_a_mixture_prior_in_one_line_naming_site_distribution_and_alternative(kind):
    x = torch.bernoulli(torch.full((6, 5), 0.5))
    with pytest.raises(DGMError) as err:
        build_guide(kind, _mixture_vae(), x)
    message = str(err.value)
    assert "\n" not in message and "'z'" in message and "MixtureSameFamily" in message and "--guide local" in message


def test_the_local_guide_handles_a_mixture_prior_by_its_components_support():
    x = torch.bernoulli(torch.full((6, 5), 0.5))
    model = _mixture_vae()
    guide = build_guide("local", model, x)
    with torch.no_grad():
        bound = ELBO(4).bound(model.model, guide, x, torch.arange(6), 6)
    assert bound.shape == (6,) and torch.isfinite(bound).all()


def test_guides_refuse_discrete_and_global_sites_in_one_line():
    data = torch.randn(8, 2)
    mixture = GaussianMixture(DataSpec((2,), "real"), GaussianMixtureConfig(num_components=3))
    with pytest.raises(DGMError, match=r"^the auto-normal guide cannot handle site 'z' \(Categorical: discrete"):
        build_guide("auto-normal", mixture, data)
    model = OffsetPPCA()
    with pytest.raises(DGMError, match=r"^the local guide cannot handle site 'theta' \(Normal: a global latent"):
        build_guide("local", model, _data(model))
    with pytest.raises(DGMError, match="auto-iaf covers global latent sites only .* use --guide auto-normal"):
        build_guide("auto-iaf", make_model(), torch.randn(8, 6))


def test_dgm_trains_with_auto_normal_and_eval_reloads_and_refits_it(tmp_path, capsys):
    """``--guide auto-normal`` from the command line: the run directory reloads the guide,
    ``dgm eval`` refits its per-datapoint parameters on the test rows, and IS agrees with
    PPCA's exact log p(x) to 0.02 nats."""
    import json

    from experiments.cli import main

    run = tmp_path / "run"
    args = ["train", "ppca", "--data", "ppca", "--guide", "auto-normal", "--epochs", "2", "--device", "cpu"]
    assert main(args + ["--eval-k", "10", "--eval-limit", "5", "--no-progress", "--run-dir", str(run)]) == 0
    nll = {}
    for estimator in ("is", "exact"):
        capsys.readouterr()
        assert main(["eval", str(run), "--estimator", estimator, "--k", "500", "--limit", "50"]) == 0
        out = capsys.readouterr().out
        nll[estimator] = json.loads(out[out.index("{") :])["nll"]
    assert abs(nll["is"] - nll["exact"]) < 0.02, nll

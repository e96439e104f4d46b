"""Labels in the contract, the class-conditional VAE and the M2 semi-supervised VAE.

* Plumbing: a model with ``uses_labels`` receives exactly the labels of its rows in
  training minibatches, validation and evaluation (exact and importance sampling); data
  without labels is refused; label-free models are bit-for-bit unaffected.
* M2 (Kingma et al. 2014): with every label observed its bound is the conditional VAE's
  ELBO plus log p(y); for unlabelled data the enumerated bound is
  ``sum_y q(y|x) (ELBO(x, y) - log q(y|x))``, both checked against hand computations from
  the raw networks in float64 (with the latent z held fixed, so they are exact).
"""

import json
import math
from dataclasses import fields, replace

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as td
import torch.nn.functional as F
from torch import nn

from experiments import data as datasets
from experiments.conditional_plots import analogy_grid, save_analogies, save_style_grid
from experiments.config import RunConfig
from experiments.labels import keep_labels
from experiments.runs import build, load_run
from inference.config import EvalConfig
from inference.enum import EnumELBO
from inference.estimators import estimate_dataset
from inference.objectives import ELBO
from inference.runner import Runner, TrainConfig
from models import MODELS
from models.base import DataError, DataSpec, DGMError, GenerativeModel
from models.latent.cvae import CVAE, CVAEConfig
from models.latent.m2 import M2, M2Config, accuracy
from models.latent.vae import VAE

TINY = dict(latent_dim=3, encoder_hidden=(7,), decoder_hidden=(7,), activation="tanh")


# --- label plumbing ----------------------------------------------------------------------------


def _label_of(x):
    """The label of a probe datapoint is a function of its (unique) value."""
    return (x.round().long().squeeze(-1) * 7) % 3


class _LabelledGaussian(GenerativeModel):
    """``x | y ~ N(mu_y, 1)``, exact; records every ``(x, y)`` that model and guide receive."""

    uses_labels = True
    has_exact_log_prob = True

    def __init__(self):
        super().__init__(DataSpec((1,), "real"))
        self.mu = nn.Parameter(torch.tensor([-1.0, 0.5, 2.0]))
        self.seen = []

    def likelihood(self, y):
        return dist.Normal(self.mu[y].unsqueeze(-1), 1.0).to_event(1)

    def model(self, x, idx=None, size=None, y=None):
        self.seen.append((x.detach().clone(), y.clone()))
        with self.data_plate(x, idx, size):
            pyro.sample("x", self.likelihood(y), obs=x)

    def guide(self, x, idx=None, size=None, y=None):
        self.seen.append((x.detach().clone(), y.clone()))

    def log_prob(self, x, y):
        return self.likelihood(y).log_prob(x)


def _probe_data(with_labels=True):
    parts = {"train": torch.arange(0.0, 61.0), "val": torch.arange(100.0, 123.0), "test": torch.arange(200.0, 230.0)}
    xs = {k: v.unsqueeze(-1) for k, v in parts.items()}
    labels = {f"{k}_labels": _label_of(v) for k, v in xs.items()} if with_labels else {}
    return datasets.Dataset("probe", DataSpec((1,), "real"), **xs, **labels)


def test_a_labelled_model_gets_the_labels_of_its_rows_in_training_validation_and_evaluation():
    data = _probe_data()
    model = _LabelledGaussian()
    cfg = TrainConfig(epochs=2, batch_size=7, lr=1e-2, device="cpu", progress=False)
    runner = Runner(model, data, ELBO(1), config=cfg, evaluation=EvalConfig(batch_size=8))
    runner.fit()
    fitted = len(model.seen)
    seen = set(torch.cat([x for x, _ in model.seen]).squeeze(-1).tolist())
    assert set(data.train.squeeze(-1).tolist()) | set(data.val.squeeze(-1).tolist()) == seen
    exact = runner.evaluate()
    sampled = runner.evaluate(estimator="is", k=3)
    seen = set(torch.cat([x for x, _ in model.seen[fitted:]]).squeeze(-1).tolist())
    assert seen == set(data.test.squeeze(-1).tolist())
    for x, y in model.seen:  # every call: minibatches (uneven), validation, evaluation
        assert torch.equal(y, _label_of(x))
    # what is evaluated is log p(x | y) at the test labels, exactly and by IS
    with torch.no_grad():
        truth = td.Normal(model.mu[data.test_labels], 1.0).log_prob(data.test.squeeze(-1)).double().mean()
    assert exact["estimator"] == "exact" and sampled["estimator"] == "is"
    assert exact["nll"] == pytest.approx(-float(truth), abs=1e-5)
    assert sampled["nll"] == pytest.approx(-float(truth), abs=1e-5)


def test_estimate_dataset_slices_conditions_like_the_data():
    model = _LabelledGaussian()
    x = torch.arange(200.0, 230.0).unsqueeze(-1)
    y = _label_of(x)
    with torch.no_grad():
        truth = td.Normal(model.mu[y], 1.0).log_prob(x.squeeze(-1)).double()
    for method in ("exact", "is", "naive"):
        est = estimate_dataset(
            model, x, method=method, num_samples=2, batch_size=7, progress=False, conditions={"y": y}
        )
        torch.testing.assert_close(est.log_px, truth)
    with pytest.raises(DGMError, match="one per datapoint"):
        estimate_dataset(model, x, method="exact", progress=False, conditions={"y": y[:-1]})


def test_a_model_that_needs_labels_refuses_data_without_them():
    cfg = TrainConfig(epochs=1, device="cpu", progress=False)
    with pytest.raises(DGMError, match="needs class labels.*labelled dataset"):
        Runner(_LabelledGaussian(), _probe_data(with_labels=False), ELBO(1), config=cfg)
    digits = datasets.load("digits")
    unlabelled = replace(digits, train_labels=None, val_labels=None, test_labels=None)
    for cls in (CVAE, M2):
        with pytest.raises(DGMError, match="needs class labels"):
            Runner(cls(digits.spec, cls.config_class(**TINY)), unlabelled, ELBO(1), config=cfg)
    cvae = CVAE(digits.spec, CVAEConfig(**TINY))
    with pytest.raises(DataError, match="partly labelled data use m2"):  # CVAE needs every label
        Runner(cvae, replace(digits, train_labels=keep_labels(digits.train_labels, 50)), ELBO(1), config=cfg)
    with pytest.raises(DGMError, match="guide amortized"):
        Runner(cvae, digits, ELBO(1), guide="local", config=cfg)
    runner = Runner(cvae, digits, ELBO(1), config=cfg)
    with pytest.raises(DGMError, match="labels="):
        runner.evaluate(digits.val)
    with pytest.raises(DGMError, match="labels y="):
        cvae.model(digits.val)


def test_label_free_models_are_unaffected_by_labels_in_the_data():
    digits = datasets.load("digits")
    results = []
    for data in (digits, replace(digits, train_labels=None, val_labels=None, test_labels=None)):
        torch.manual_seed(0)
        model = VAE(digits.spec, MODELS["vae"].presets["small"])
        cfg = TrainConfig(epochs=1, max_steps=5, device="cpu", progress=False)
        runner = Runner(model, data, ELBO(1), config=cfg, evaluation=EvalConfig(k=5, limit=20))
        runner.fit()
        results.append((model.state_dict(), runner.evaluate()))
    (a, ra), (b, rb) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra.pop("eval_seconds"), rb.pop("eval_seconds")
    assert repr(ra) == repr(rb)  # (repr: nan == nan)


# --- label budgets -------------------------------------------------------------------------


def test_keep_labels_is_balanced_fixed_by_the_seed_and_marks_the_rest_unlabelled():
    labels = datasets.load("digits").train_labels
    kept = keep_labels(labels, 53, seed=3)
    mask = kept >= 0
    assert int(mask.sum()) == 53 and torch.equal(kept[mask], labels[mask])
    assert sorted(torch.bincount(kept[mask], minlength=10).tolist()) == [5] * 7 + [6] * 3
    assert torch.equal(kept, keep_labels(labels, 53, seed=3))
    assert not torch.equal(kept, keep_labels(labels, 53, seed=4))
    with pytest.raises(DGMError, match="at least one per class"):
        keep_labels(labels, 5)


def test_a_run_spec_label_budget_reaches_the_runner():
    config = RunConfig.from_flat(
        model="m2", preset="small", data="digits", labelled=30, train=TrainConfig(device="cpu")
    )
    runner, data = build(config)
    y = runner.labels["train"]
    assert int((y >= 0).sum()) == 30 and torch.bincount(y[y >= 0], minlength=10).tolist() == [3] * 10
    assert torch.equal(runner.labels["test"], data.test_labels)  # held-out labels stay complete
    with pytest.raises(DGMError, match="label budget is for m2"):
        build(replace(config, model=replace(config.model, name="cvae")))


# --- M2: the bounds, by hand ---------------------------------------------------------------------


def _m2(alpha=0.0, **kw):
    return M2(
        DataSpec((6,), "binary"),
        M2Config(**{**TINY, "num_classes": 4, "classifier_hidden": (5,), "alpha": alpha, **kw}),
    )


def _fixed_z(guide, z):
    """``guide`` with its z site held at ``z`` (replayed, still a latent site)."""
    trace = poutine.trace(lambda: pyro.sample("z", dist.Delta(z, event_dim=1))).get_trace()
    return poutine.replay(guide, trace=trace)


def _joint_terms(m, x, z, c):
    """``log p(x | c, z) + log p(c) + log p(z) - log q(z | x, c)`` straight from the networks."""
    e = F.one_hot(c, m.config.num_classes).to(x.dtype)
    log_lik = td.Bernoulli(logits=m.decoder(torch.cat([z, e], -1))).log_prob(x).sum(-1)
    loc, raw = m.encoder(torch.cat([x, e], -1)).chunk(2, -1)
    log_q = td.Normal(loc, F.softplus(raw) + m.config.min_posterior_scale).log_prob(z).sum(-1)
    log_pz = td.Normal(0.0, 1.0).log_prob(z).sum(-1)
    return log_lik - math.log(m.config.num_classes) + log_pz - log_q


def _batch(b=5):
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((b, 6), 0.5), generator=g), torch.randn(b, 3, generator=g)


@pytest.mark.parametrize("objective", [EnumELBO(1), ELBO(1)])
def test_m2_with_every_label_observed_is_the_conditional_vae_elbo(float64, objective):
    m = _m2().eval()
    x, z = _batch()
    y = torch.tensor([0, 3, 1, 1, 2])
    bound = objective.bound(m.model, _fixed_z(m.guide, z), x, y=y)
    torch.testing.assert_close(bound, _joint_terms(m, x, z, y))
    # the conditional VAE with the same networks: the same bound without log p(y)
    cvae = CVAE(m.data_spec, CVAEConfig(**{f.name: getattr(m.config, f.name) for f in fields(CVAEConfig)}))
    missing, unexpected = cvae.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.startswith("classifier.") for k in unexpected)
    cvae_bound = objective.bound(cvae.model, _fixed_z(cvae.guide, z), x, y=y)
    torch.testing.assert_close(bound, cvae_bound - math.log(4))


def test_m2_unlabelled_bound_is_the_exact_sum_over_classes(float64):
    m = _m2().eval()
    x, z = _batch()
    bound = EnumELBO(1).bound(m.model, _fixed_z(m.guide, z), x, y=torch.full((5,), -1))
    log_q = m.classifier_logits(x)
    by_hand = torch.zeros(5)
    for c in range(4):  # sum_y q(y|x) (ELBO(x, y) - log q(y|x))
        cls = torch.full((5,), c)
        by_hand = by_hand + log_q[:, c].exp() * (_joint_terms(m, x, z, cls) - log_q[:, c])
    torch.testing.assert_close(bound, by_hand)
    assert torch.equal(EnumELBO(1).bound(m.model, _fixed_z(m.guide, z), x), bound)  # y=None: unlabelled


def test_m2_mixed_batch_rows_match_their_labelled_and_unlabelled_bounds(float64):
    m = _m2().eval()
    x, z = _batch()
    y = torch.tensor([2, 0, 1, 3, 0])
    unlabelled = torch.tensor([False, True, False, True, True])
    elbo = EnumELBO(1)
    mixed = elbo.bound(m.model, _fixed_z(m.guide, z), x, y=torch.where(unlabelled, -1, y))
    labelled = elbo.bound(m.model, _fixed_z(m.guide, z), x, y=y)
    none = elbo.bound(m.model, _fixed_z(m.guide, z), x, y=torch.full((5,), -1))
    torch.testing.assert_close(mixed, torch.where(unlabelled, none, labelled))


def test_m2_importance_sampling_estimates_log_p_x_y_and_log_p_x_by_quadrature(float64):
    """With one latent dimension, ``log p(x | y) = log int p(x | y, z) N(z) dz`` by the
    trapezoidal rule; IS through the guide (the point mass at given labels, q(y|x)
    otherwise) must find ``log p(x, y) = log p(x | y) - log K`` and
    ``log p(x) = logsumexp_y log p(x, y)``, and the enumerated bounds must lie below."""
    m = _m2(latent_dim=1).eval()
    x, _ = _batch(3)
    grid = torch.linspace(-9.0, 9.0, 3001)
    per_class = []
    with torch.no_grad():
        for c in range(4):
            e = F.one_hot(torch.full((len(grid),), c), 4).double()
            log_lik = td.Bernoulli(logits=m.decoder(torch.cat([grid[:, None], e], -1))).log_prob(x[:, None]).sum(-1)
            integrand = (log_lik + td.Normal(0.0, 1.0).log_prob(grid)).exp()
            per_class.append(torch.trapezoid(integrand, grid).log() - math.log(4))
    log_pxy = torch.stack(per_class, -1)  # [B, K]
    y = torch.tensor([1, 3, 0])
    labelled = estimate_dataset(m, x, method="is", num_samples=20000, progress=False, conditions={"y": y})
    unlabelled = estimate_dataset(m, x, method="is", num_samples=20000, progress=False, conditions={"y": y * 0 - 1})
    torch.testing.assert_close(labelled.log_px, log_pxy.gather(-1, y[:, None]).squeeze(-1), atol=0.03, rtol=0)
    torch.testing.assert_close(unlabelled.log_px, log_pxy.logsumexp(-1), atol=0.03, rtol=0)
    assert (EnumELBO(1000).bound(m.model, m.guide, x, y=y * 0 - 1) < log_pxy.logsumexp(-1)).all()


def test_m2_training_adds_alpha_log_q_on_labelled_rows_and_has_finite_gradients(float64):
    m = _m2(alpha=2.5)
    x, z = _batch()
    y = torch.tensor([2, -1, 1, -1, -1])
    elbo = EnumELBO(1)
    train_bound = elbo.bound(m.model, _fixed_z(m.guide, z), x, y=y)
    eval_bound = elbo.bound(m.eval().model, _fixed_z(m.guide, z), x, y=y)
    log_q = m.classifier_logits(x).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(train_bound - eval_bound, torch.where(y >= 0, 2.5 * log_q, torch.zeros(5)))
    m.train()
    loss, _ = elbo.loss_terms(m.model, m.guide, x, y=y)  # sampled z, point masses at the labels
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.classifier[0].weight.grad.abs().sum() > 0


def test_m2_learns_to_classify_digits_from_50_labels(one_thread):
    digits = datasets.load("digits")
    data = replace(digits, train_labels=keep_labels(digits.train_labels, 50, seed=0))
    torch.manual_seed(0)
    model = M2(digits.spec, replace(M2Config(**TINY), latent_dim=8, classifier_hidden=(64,), alpha=20.0))
    runner = Runner(
        model, data, EnumELBO(1), config=TrainConfig(epochs=12, batch_size=50, lr=3e-3, device="cpu", progress=False)
    )
    runner.fit()
    assert accuracy(model, digits.test, digits.test_labels) > 0.6  # chance: 0.1 (0.71 measured)


# --- CVAE ------------------------------------------------------------------------------------


def test_cvae_uses_the_label_in_decoder_and_guide_and_draws_analogies(tmp_path, one_thread):
    digits = datasets.load("digits")
    torch.manual_seed(0)
    model = CVAE(digits.spec, CVAE.presets["small"])
    cfg = TrainConfig(epochs=15, batch_size=50, lr=3e-3, device="cpu", progress=False)
    runner = Runner(model, digits, ELBO(1), config=cfg, evaluation=EvalConfig(k=10, limit=50))
    runner.fit()
    result = runner.evaluate()  # IS with the test labels, and active units through the guide
    assert result["estimator"] == "is" and result["active_units"] >= 1

    model.eval()
    x, y = digits.test, digits.test_labels
    wrong = (y + 1) % 10
    z = torch.randn(4, model.config.latent_dim)
    assert not torch.allclose(model.decode_mean(z, y[:4]), model.decode_mean(z, wrong[:4]), atol=1e-3)
    assert not torch.allclose(model.encode(x[:4], y[:4]), model.encode(x[:4], wrong[:4]), atol=1e-3)
    # the label carries information about x: the true class explains the test images better
    true_bound = ELBO(10).bound(model.model, model.guide, x, y=y).mean()
    wrong_bound = ELBO(10).bound(model.model, model.guide, x, y=wrong).mean()
    assert true_bound > wrong_bound + 3.0

    grid = analogy_grid(model, z)
    torch.testing.assert_close(grid[2 * 10 + 7], model.decode_mean(z[2:3], torch.tensor([7]))[0])
    for path in (
        save_analogies(model, tmp_path / "analogies.png", x, y, n=5),
        save_analogies(model, tmp_path / "prior.png", n=3),
        save_style_grid(model, tmp_path / "styles.png", per_class=4),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = model.sample(20)  # classes in turn
    assert samples.shape == (20, 64) and set(samples.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match="classes 0..9"):
        model.sample(3, y=torch.tensor([0, 10, 1]))
    with pytest.raises(DGMError, match="not class-conditional"):
        save_style_grid(VAE(digits.spec, VAE.presets["small"]), tmp_path / "x.png")


def test_cli_label_budget_and_m2_accuracy_in_the_summary(tmp_path, one_thread):
    from experiments.cli import main

    run = tmp_path / "m2"
    args = ["train", "m2", "--preset", "small", "--data", "digits", "--labelled", "50", "--objective", "elbo-enum"]
    args += ["--epochs", "1", "--max-steps", "5", "--eval-k", "5", "--eval-limit", "30", "--no-progress"]
    assert main(args + ["--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["labelled"] == 50
    summary = json.loads((run / "summary.json").read_text())
    loaded = load_run(run)
    expected = accuracy(loaded.model, loaded.data.test, loaded.data.test_labels)
    assert summary["test"]["accuracy"] == pytest.approx(expected)
    assert 0.0 <= expected <= 1.0
    assert (
        main(
            [
                "train",
                "vae",
                "--preset",
                "small",
                "--data",
                "digits",
                "--labelled",
                "50",
                "--run-dir",
                str(tmp_path / "v"),
            ]
        )
        == 2
    )

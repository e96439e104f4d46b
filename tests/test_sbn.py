"""Sigmoid belief nets: exact enumeration against normalization and the Pyro program, the
estimators and bounds against it, and unbiased score-function gradients against the exact
gradient of the exactly enumerated ELBO (float64, fixed seeds)."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

from experiments import data as datasets
from inference.config import EvalConfig, ObjectiveConfig
from inference.enum import EnumELBO
from inference.estimators import estimate_dataset
from inference.objective import make_objective
from inference.objectives import IWAE, ScoreFunctionELBO
from inference.runner import Runner, TrainConfig
from models import MODELS
from models.base import DataError, DataSpec, DGMError
from models.latent.sbn import MAX_EXACT_BITS, SBN, SBNConfig, all_binary_vectors

LAYERS = [(3,), (2, 2), (1, 3)]


def tiny_sbn(layers=(3,), d=6, seed=0, scale=1.0) -> SBN:
    """A tiny net with weights large enough that posteriors are far from the guide."""
    torch.manual_seed(seed)
    m = SBN(DataSpec((d,), "binary"), SBNConfig(layers=layers, init_scale=scale)).double()
    with torch.no_grad():
        m.prior_logits.normal_()
        for layer in [*m.decoders, *m.encoders]:
            layer.bias.normal_()
    return m


def exact_elbo(m: SBN, x: torch.Tensor) -> torch.Tensor:
    """``sum_h q(h | x) [log p(x, h) - log q(h | x)]`` by enumerating every h: ``[B]``."""
    hs = [h.unsqueeze(1) for h in m.enumerate_latents()]  # [C, 1, L_l]
    log_q = m.guide_log_prob(x, hs)  # [C, B]
    return (log_q.exp() * (m.log_joint(x, hs) - log_q)).sum(0)


@pytest.mark.parametrize("layers", LAYERS)
def test_exact_log_prob_sums_to_one_over_all_binary_x(float64, layers):
    m = tiny_sbn(layers)
    with torch.no_grad():
        total = m.log_prob(all_binary_vectors(6, torch.float64)).exp().sum().item()
    assert abs(total - 1.0) < 1e-12


@pytest.mark.parametrize("layers", LAYERS)
def test_log_joint_and_guide_density_are_those_of_the_pyro_program(float64, layers):
    """The enumeration helpers score the same joint as the model and guide sites."""
    m = tiny_sbn(layers)
    x = m.sample(5)
    trace = poutine.trace(m.guide).get_trace(x)
    hs = [trace.nodes[m.site(layer)]["value"] for layer in range(1, len(layers) + 1)]
    model_trace = poutine.trace(poutine.replay(m.model, trace=trace)).get_trace(x)
    model_trace.compute_log_prob()
    trace.compute_log_prob()
    joint = sum(site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample")
    guide = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")
    torch.testing.assert_close(m.log_joint(x, hs), joint)
    torch.testing.assert_close(m.guide_log_prob(x, hs), guide)


def test_exact_estimator_and_instance_level_exactness(float64):
    m = tiny_sbn((2, 2))
    x = m.sample(7)
    with torch.no_grad():
        est = estimate_dataset(m, x, method="exact", progress=False)
        torch.testing.assert_close(est.log_px, m.log_prob(x), rtol=0, atol=0)
    assert m.has_exact_log_prob
    big = SBN(DataSpec((6,), "binary"), SBNConfig(layers=(MAX_EXACT_BITS + 1,)))
    assert not big.has_exact_log_prob and SBN(DataSpec((6,), "binary"), SBNConfig(layers=(6, 6))).has_exact_log_prob
    with pytest.raises(DGMError, match="estimator is"):
        big.log_prob(x.float())
    with pytest.raises(DGMError, match="no exact"):
        estimate_dataset(big, x.float(), method="exact", progress=False)


def test_runner_evaluates_exactly_only_when_the_net_is_enumerable():
    data = datasets.load("digits")
    config = TrainConfig(epochs=1, max_steps=1, device="cpu", progress=False)
    for preset, method in (("tiny", "exact"), ("small", "is")):
        torch.manual_seed(0)
        m = SBN(data.spec, SBN.presets[preset])
        objective = make_objective(ObjectiveConfig(name="elbo-sf"))
        runner = Runner(m, data, objective, config=config, evaluation=EvalConfig(k=5, limit=20))
        runner.fit()
        assert runner.evaluate()["estimator"] == method


@pytest.mark.parametrize("method", ["naive", "is"])
def test_sampling_estimators_converge_to_exact_log_prob(float64, method):
    m = tiny_sbn((2, 3), d=20, seed=1)
    x = m.sample(10)
    exact = m.log_prob(x).detach()
    errors = []
    for k in (2, 20_000):
        est = estimate_dataset(m, x, method=method, num_samples=k, progress=False)
        errors.append((est.log_px - exact).abs().mean().item())
    assert errors[1] < 0.2 * errors[0], errors
    assert ((est.log_px - exact).abs() <= 4 * est.stderr + 1e-3).all(), (est.log_px - exact, est.stderr)


def test_elbo_iwae_k_iwae_2k_and_log_px_are_ordered_on_average(float64):
    """E[ELBO] <= E[IWAE_k] <= E[IWAE_2k] <= log p(x) (Burda et al. 2016, Theorem 1), with a
    fixed guide; the Monte Carlo ELBO's mean also matches the enumerated ELBO."""
    m = tiny_sbn((2, 2), seed=2)
    x = m.sample(4)
    reps = 4000
    xr = x.repeat(reps, 1)
    with torch.no_grad():
        exact, elbo = m.log_prob(x), exact_elbo(m, x)
    means, errs = [], []
    for k in (1, 2, 4):
        b = IWAE(k).bound(m.model, m.guide, xr).reshape(reps, -1)
        means.append(b.mean(0))
        errs.append(b.std(0) / reps**0.5)
    torch.testing.assert_close(means[0], elbo, rtol=0, atol=4 * errs[0].max().item())
    for lo, hi, e_lo, e_hi in zip(means[:-1], means[1:], errs[:-1], errs[1:]):
        assert (hi - lo > 3 * (e_lo + e_hi)).all(), (lo, hi)
    assert (exact - means[-1] > 3 * errs[-1]).all()


def _sf_objectives(x):
    neural = ScoreFunctionELBO(decay=0.9, neural_baseline=True, input_dim=x.shape[-1])
    neural.net.double()
    with torch.no_grad():  # an arbitrary, non-zero b(x): baselines must not bias the gradient
        for p in neural.net.parameters():
            p.normal_(std=0.5)
    return {
        "none": ScoreFunctionELBO(decay=None),
        "average": ScoreFunctionELBO(decay=0.9),
        "neural": neural,
        "dice (elbo-enum)": EnumELBO(max_plate_nesting=1),
    }


@pytest.mark.parametrize("layers", [(3,), (2, 2)])
@pytest.mark.parametrize("baseline", ["none", "average", "neural", "dice (elbo-enum)"])
def test_score_function_gradient_is_unbiased(float64, layers, baseline):
    """The average over many particles of the score-function gradient of every parameter
    (guide and model) matches the exact gradient of the enumerated ELBO, with and without
    baselines. The error allowed is a few Monte Carlo standard errors, estimated from
    independent repeats."""
    m = tiny_sbn(layers, seed=3)
    x = m.sample(3)
    params = list(m.parameters())
    exact = torch.autograd.grad(exact_elbo(m, x).sum(), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    obj = _sf_objectives(x)[baseline]
    obj.num_particles = 2000
    if baseline == "dice (elbo-enum)":
        obj = EnumELBO(2000, max_plate_nesting=1)
    else:
        obj.loss_terms(m.model, m.guide, x)  # warm the running average: later calls use a past value
    repeats = []
    for _ in range(10):
        loss, _ = obj.loss_terms(m.model, m.guide, x)
        grads = torch.autograd.grad(-loss, params)
        repeats.append(torch.cat([g.reshape(-1) for g in grads]))
    repeats = torch.stack(repeats)
    mean, stderr = repeats.mean(0), repeats.std(0) / repeats.shape[0] ** 0.5
    assert ((mean - exact).abs() <= 5 * stderr + 1e-8).all(), ((mean - exact) / stderr).abs().max()
    assert (exact.abs() > 10 * stderr).any()  # the check has power: some gradients are resolved


def test_a_biased_estimator_fails_the_unbiasedness_check(float64):
    """The check above has teeth: the pathwise-only gradient (dropping the score function)
    is biased for the guide and is caught."""
    m = tiny_sbn((3,), seed=3)
    x = m.sample(3)
    enc = list(m.encoders.parameters())
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_elbo(m, x).sum(), enc)])
    obj = ScoreFunctionELBO(2000, decay=None)
    repeats = []
    for _ in range(10):
        lw = obj.log_weights(m.model, m.guide, x)
        grads = torch.autograd.grad(lw.log_w.mean(0).sum(), enc)  # no score-function term
        repeats.append(torch.cat([g.reshape(-1) for g in grads]))
    repeats = torch.stack(repeats)
    mean, stderr = repeats.mean(0), repeats.std(0) / repeats.shape[0] ** 0.5
    assert ((mean - exact).abs() > 5 * stderr + 1e-8).any()


@pytest.mark.parametrize("baseline", ["average", "neural"])
def test_two_layer_sbn_trains_with_score_function_baselines(baseline):
    """The neural baseline b(x) serves a multi-site model: it is fitted (its parameters
    move) and the training ELBO improves."""
    data = datasets.load("digits")
    torch.manual_seed(0)
    m = SBN(data.spec, SBNConfig(layers=(8, 16)))
    obj = make_objective(ObjectiveConfig(name="elbo-sf", baseline=baseline), data.spec)
    net_before = [p.detach().clone() for p in obj.modules()[0].parameters()] if obj.modules() else []
    val = data.val
    before = obj.bound(m.model, m.guide, val).mean().item()
    runner = Runner(m, data, obj, config=TrainConfig(epochs=3, lr=1e-2, device="cpu", progress=False))
    runner.fit()
    after = obj.bound(m.model, m.guide, val).mean().item()
    assert after > before + 5, (before, after)
    for old, new in zip(net_before, obj.modules()[0].parameters() if obj.modules() else []):
        assert not torch.equal(old, new)


def test_registry_presets_and_errors():
    assert MODELS["sbn"] is SBN
    assert {"tiny", "small", "mnist-1layer", "mnist-2layer"} <= set(SBN.presets)
    assert SBN.presets["mnist-2layer"].layers == (200, 200)
    spec = DataSpec((784,), "binary")
    assert SBN(spec, SBN.presets["tiny"]).has_exact_log_prob
    assert not SBN(spec, SBN.presets["mnist-1layer"]).has_exact_log_prob
    with pytest.raises(DataError, match="binar"):
        SBN(DataSpec((4,), "real"))
    with pytest.raises(DGMError, match="layers"):
        SBN(spec, SBNConfig(layers=()))
    m = SBN(DataSpec((6,), "binary"), SBNConfig(layers=(2, 3)))
    with pytest.raises(DGMError, match="sizes"):
        m.log_joint(torch.zeros(6), [torch.zeros(2), torch.zeros(3)])

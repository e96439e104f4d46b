"""MADE (Germain et al. 2015): normalization, causality, sampling, mask cycling, training."""

import itertools
import math

import pytest
import torch
from torch import nn

from experiments.data import load
from inference import ELBO
from models.autoregressive.made import MADE, PRESETS, MADEConfig
from models.base import DataSpec, DGMError
from tests.helpers import fit_exact

AGNOSTIC = dict(order_agnostic=True, connectivity_agnostic=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def all_configurations(dim, levels=2):
    return torch.tensor(list(itertools.product(range(levels), repeat=dim)), dtype=torch.get_default_dtype())


def spread_init(model, std=1.0, seed=0):
    """Larger random weights than the default init, so the distribution is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


# --- normalization by enumeration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "event_shape, config",
    [
        ((8,), MADEConfig(hidden=(16,))),
        ((2, 4), MADEConfig(hidden=(16, 16), **AGNOSTIC)),  # a random order and random degrees
        ((8,), MADEConfig(hidden=(16,), num_masks=4, ensemble=4, **AGNOSTIC)),
        ((8,), MADEConfig(hidden=(16,), num_masks=4, ensemble=4, direct_connections=True, **AGNOSTIC)),
        ((8,), MADEConfig(hidden=())),  # no hidden layer: a logistic autoregressive model
    ],
    ids=["one-mask", "random-order-and-degrees", "ensemble-4", "ensemble-4-direct", "no-hidden"],
)
def test_binary_probabilities_sum_to_one(float64, event_shape, config):
    model = spread_init(MADE(DataSpec(event_shape, "binary"), config)).eval()
    x = all_configurations(8).reshape((256,) + event_shape)
    total = model.log_prob(x).exp().sum()
    assert abs(total.item() - 1) < 1e-6
    model.train()  # every member of the cycle is normalized too
    for _ in range(config.num_masks):
        assert abs(model.log_prob(x).exp().sum().item() - 1) < 1e-6


@pytest.mark.parametrize("ensemble", [1, 3])
def test_categorical_probabilities_sum_to_one(float64, ensemble):
    config = MADEConfig(hidden=(12, 12), num_masks=3, ensemble=ensemble, **AGNOSTIC)
    model = spread_init(MADE(DataSpec((3,), "categorical", num_levels=4), config)).eval()
    x = all_configurations(3, levels=4)
    assert x.shape == (64, 3)
    assert abs(model.log_prob(x).exp().sum().item() - 1) < 1e-6


# --- causality through gradients -----------------------------------------------------------------


def dependency_matrix(fn, x):
    """``dep[i, j]``: output column ``i`` of ``fn`` has a non-zero gradient in ``x_j`` somewhere
    in the batch (rows of ``x`` are independent datapoints, so column sums give the Jacobian)."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    rows = []
    for i in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)
        rows.append(grad.abs().sum(0) > 0)
    return torch.stack(rows)


def autoregressive_violations(model, mask_index, x):
    """``(leaks, unconditioned)`` of one mask set: ``(i, j)`` where the logit of ``x_i`` depends
    on an ``x_j`` that is not strictly before ``i`` in the order, and the ``i`` (not first)
    whose logit depends on no earlier ``x_j`` at all. Also checks ``conditional_log_probs``,
    which may depend on ``x_i`` itself (it is the value scored) but on nothing later."""
    rank = torch.empty_like(model.orders[mask_index])
    rank[model.orders[mask_index]] = torch.arange(len(rank))
    before = rank[None, :] < rank[:, None]  # before[i, j]: j comes strictly before i
    dep = dependency_matrix(lambda v: model.logits(v, mask_index), x)
    dep_lp = dependency_matrix(lambda v: model.conditional_log_probs(v, mask_index), x)
    leaks = (dep & ~before) | (dep_lp & ~before & ~torch.eye(len(rank), dtype=torch.bool))
    unconditioned = [i for i in range(len(rank)) if rank[i] > 0 and not dep[i][before[i]].any()]
    return leaks.nonzero().tolist(), unconditioned


@pytest.mark.parametrize("dim", [5, 9])
@pytest.mark.parametrize("hidden", [(40,), (40, 40)], ids=["1-layer", "2-layers"])
@pytest.mark.parametrize(
    "masks",
    [dict(), dict(num_masks=3, **AGNOSTIC), dict(num_masks=2, order_agnostic=True, direct_connections=True)],
    ids=["natural", "3-random", "2-random-orders-direct"],
)
def test_conditionals_depend_only_on_earlier_dimensions(float64, dim, hidden, masks):
    model = MADE(DataSpec((dim,), "binary"), MADEConfig(hidden=hidden, **masks))
    x = torch.randn(32, dim, generator=torch.Generator().manual_seed(1))
    for m in range(model.num_masks):
        leaks, unconditioned = autoregressive_violations(model, m, x)
        assert leaks == [], f"mask {m}: logit i depends on x_j for (i, j) in {leaks}"
        assert unconditioned == [], f"mask {m}: conditionals {unconditioned} see no earlier input"
    if masks.get("order_agnostic"):
        assert not torch.equal(model.orders[0], model.orders[1])


def test_a_leaking_mask_is_detected(float64):
    model = MADE(DataSpec((6,), "binary"), MADEConfig(hidden=(30,), **AGNOSTIC))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    assert autoregressive_violations(model, 0, x) == ([], [])
    first = int(model.orders[0][0])  # degree 1: its logit may see nothing
    unit = int(model.degrees[0].argmax())  # a hidden unit of degree >= 2 sees a later input
    assert model.degrees[0][unit] >= 2
    out = model.layers[-1]
    assert out.mask[first, unit] == 0
    out.mask[first, unit] = 1  # one forbidden connection in the output layer
    leaks, _ = autoregressive_violations(model, 0, x)
    assert leaks and all(i == first for i, _ in leaks)


def test_categorical_conditionals_depend_only_on_earlier_dimensions(float64):
    """One-hot inputs have no gradient in x: perturb each x_j to another level instead."""
    k, dim = 3, 5
    model = MADE(DataSpec((dim,), "categorical", num_levels=k), MADEConfig(hidden=(30, 30), num_masks=2, **AGNOSTIC))
    x = torch.randint(k, (64, dim), generator=torch.Generator().manual_seed(2)).double()
    for m in range(2):
        base = model.logits(x, m)
        rank = torch.empty_like(model.orders[m])
        rank[model.orders[m]] = torch.arange(dim)
        for j in range(dim):
            moved = x.clone()
            moved[:, j] = (moved[:, j] + 1) % k
            changed = (model.logits(moved, m) != base).any(-1).any(0)  # [D]: logits of x_i changed
            assert torch.equal(changed, rank > rank[j]), f"mask {m}, x_{j}"


# --- sampling matches the density ----------------------------------------------------------------


def assert_frequencies_match(p, num_levels, samples):
    """Empirical frequencies of all configurations (``p`` in lexicographic order) within 5
    binomial standard errors of ``p``."""
    dim = samples.shape[1]
    codes = (samples.long() * num_levels ** torch.arange(dim - 1, -1, -1)).sum(-1)
    freq = torch.bincount(codes, minlength=num_levels**dim).double() / len(samples)
    stderr = (p * (1 - p) / len(samples)).sqrt()
    assert ((freq - p).abs() < 5 * stderr).all(), (freq, p)


@pytest.mark.parametrize(
    "config, mask_index",
    [
        (MADEConfig(hidden=(8,)), 0),
        (MADEConfig(hidden=(8, 8), num_masks=3, **AGNOSTIC), 2),  # one member of the family
        (MADEConfig(hidden=(8,), num_masks=2, ensemble=2, order_agnostic=True), None),  # the mixture
    ],
    ids=["one-mask", "member-2", "ensemble-mixture"],
)
def test_binary_samples_follow_log_prob(float64, config, mask_index):
    model = spread_init(MADE(DataSpec((3,), "binary"), config), std=1.5).eval()
    if mask_index is None:
        assert not torch.equal(model.orders[0], model.orders[1])
    samples = model.sample(100_000, mask_index=mask_index, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (100_000, 3)
    x = all_configurations(3)
    if mask_index is None:
        p = model.log_prob(x).exp()  # the eval-mode model: the mixture of the first two
    else:
        p = model.conditional_log_probs(x, mask_index).sum(-1).exp()
    assert_frequencies_match(p, 2, samples)


def test_categorical_samples_follow_log_prob(float64):
    config = MADEConfig(hidden=(8,), num_masks=2, ensemble=2, **AGNOSTIC)
    model = spread_init(MADE(DataSpec((2,), "categorical", num_levels=3), config), std=1.5).eval()
    samples = model.sample(100_000, generator=torch.Generator().manual_seed(4))
    assert set(samples.unique().tolist()) <= {0.0, 1.0, 2.0}
    assert_frequencies_match(model.log_prob(all_configurations(2, 3)).exp(), 3, samples)


# --- mask cycling, the ensemble and the state dict --------------------------------------------------


def test_training_cycles_masks_and_eval_is_deterministic(float64):
    model = MADE(DataSpec((6,), "binary"), MADEConfig(hidden=(20,), num_masks=3, ensemble=2, **AGNOSTIC))
    x = torch.bernoulli(torch.full((10, 6), 0.5), generator=torch.Generator().manual_seed(5))
    calls = [model.conditional_log_probs(x) for _ in range(4)]  # train mode: masks 0, 1, 2, 0
    for a, b in itertools.combinations(calls[:3], 2):
        assert not torch.allclose(a, b)
    assert torch.equal(calls[3], calls[0])
    for m in range(3):
        assert torch.equal(calls[m], model.conditional_log_probs(x, mask_index=m))
    model.eval()
    first = model.log_prob(x)
    assert torch.equal(first, model.log_prob(x))
    members = torch.stack([model.conditional_log_probs(x, m).sum(-1) for m in range(2)])
    torch.testing.assert_close(first, members.logsumexp(0) - math.log(2))
    assert (first >= members.mean(0) - 1e-12).all()  # Jensen: the ensemble beats its average member
    assert torch.equal(model.conditional_log_probs(x), calls[0])  # eval: mask set 0, no advance


def test_ensemble_log_prob_has_gradients(float64):
    """Several masks are evaluated before one backward pass (the masks are not overwritten)."""
    model = MADE(DataSpec((6,), "binary"), MADEConfig(hidden=(20,), num_masks=3, ensemble=3, **AGNOSTIC)).eval()
    x = torch.bernoulli(torch.full((10, 6), 0.5), generator=torch.Generator().manual_seed(5))
    model.log_prob(x).sum().backward()
    weight = model.layers[0].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_state_dict_round_trip_reproduces_the_model(float64):
    spec = DataSpec((6,), "binary")
    config = MADEConfig(hidden=(20, 20), num_masks=4, ensemble=3, direct_connections=True, **AGNOSTIC)
    model = spread_init(MADE(spec, config))
    x = torch.bernoulli(torch.full((10, 6), 0.5), generator=torch.Generator().manual_seed(6))
    model.conditional_log_probs(x)  # advance the training cycle to mask set 1
    fresh = MADE(spec, MADEConfig(**{**vars(config), "seed": 7}))
    assert not torch.equal(fresh.orders, model.orders)
    fresh.load_state_dict(model.state_dict())
    for net in (model, fresh):
        net.eval()
    assert torch.equal(fresh.log_prob(x), model.log_prob(x))
    g = lambda: torch.Generator().manual_seed(8)  # noqa: E731
    assert torch.equal(fresh.sample(50, generator=g()), model.sample(50, generator=g()))
    for net in (model, fresh):
        net.train()
    assert torch.equal(fresh.conditional_log_probs(x), model.conditional_log_probs(x))  # same place in the cycle


# --- the objectives and the runner ------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("train", [False, True], ids=["eval-ensemble", "train-one-mask"])
def test_elbo_is_the_exact_log_likelihood(float64, k, train):
    """No latent sites: every log-weight is log p(x), and the loss is -(N / B) sum log p(x)
    (in training, under the mask set of that step: here set 1, the second of the cycle)."""
    config = MADEConfig(hidden=(16,), num_masks=3, ensemble=3, **AGNOSTIC)
    model = MADE(DataSpec((7,), "binary"), config).train(train)
    x = torch.bernoulli(torch.full((5, 7), 0.3), generator=torch.Generator().manual_seed(9))
    if train:
        model.log_prob(x)  # uses set 0 and advances the cycle
    loss = ELBO(k).differentiable_loss(model.model, model.guide, x, torch.arange(5), 40)
    log_px = model.conditional_log_probs(x, 1).sum(-1) if train else model.log_prob(x)
    torch.testing.assert_close(loss, -8 * log_px.sum())
    if train:
        assert not torch.allclose(log_px, model.conditional_log_probs(x, 0).sum(-1))


def independent_nll(train, test, levels):
    """Test NLL of the best independent model of the training set: per-pixel level
    frequencies, Laplace-smoothed (some pixels never take some levels in training)."""
    counts = nn.functional.one_hot(train.long(), levels).sum(0) + 1.0  # [D, K]
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    return -(nn.functional.one_hot(test.long(), levels) * log_p).sum((1, 2)).mean().item()


# Measured (seed 0, 30 epochs, test NLL in nats over the 360 test digits, stderr ~0.2 / ~0.6):
#   digits   small         MADE 21.1  vs  independent Bernoulli   25.3
#   digits   mnist-8masks  MADE 21.0 (ensemble of 8)
#   digits17 small         MADE 99.9  vs  independent categorical 108.0
@pytest.mark.parametrize(
    "dataset, preset, margin",
    [("digits", "small", 3.0), ("digits", "mnist-8masks", 3.0), ("digits17", "small", 5.0)],
)
def test_training_through_the_runner_beats_the_independent_model(dataset, preset, margin):
    data = load(dataset)
    nll = fit_exact(MADE(data.spec, PRESETS[preset]), data)  # eval mode: the ensemble of masks
    independent = independent_nll(data.train, data.test, data.spec.num_levels or 2)
    assert nll < independent - margin, (nll, independent)


# --- what MADE refuses ---------------------------------------------------------------------------------


def test_real_data_is_rejected():
    with pytest.raises(DGMError, match="RNADE"):
        MADE(DataSpec((4,), "real"))


@pytest.mark.parametrize(
    "config",
    [
        MADEConfig(num_masks=2, ensemble=3, **AGNOSTIC),
        MADEConfig(num_masks=4),  # fixed order and degrees: four identical masks
        MADEConfig(activation="sigmoidish"),
        MADEConfig(hidden=(), direct_connections=True),
    ],
)
def test_inconsistent_configs_are_rejected(config):
    with pytest.raises(DGMError):
        MADE(DataSpec((4,), "binary"), config)


def test_presets_build_on_mnist():
    spec = DataSpec((784,), "binary", image_shape=(28, 28))
    for name, config in MADE.presets.items():
        model = MADE(spec, config)
        assert model.orders.shape == (config.num_masks, 784)
    assert torch.equal(MADE(spec, PRESETS["mnist-1mask"]).orders[0], torch.arange(784))
    eight = MADE(spec, PRESETS["mnist-8masks"])
    assert len({tuple(o.tolist()) for o in eight.orders}) == 8  # eight orders
    assert len({tuple(d.tolist()) for d in eight.degrees}) == 8  # and eight connectivities

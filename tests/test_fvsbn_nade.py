"""FVSBN and NADE: the mathematics, asserted.

* normalization: ``sum_x p(x) = 1`` by enumerating every configuration;
* causality through gradients (and exact invariance): conditional ``i`` depends on ``x_j``
  only for ``j`` strictly before ``i``, and on some such ``j``; a leaking mask is caught;
* the vectorized passes equal hand-written per-dimension loops;
* ancestral samples match ``exp(log_prob)`` cell by cell;
* trained through the runner on digits, both beat independent-pixel baselines.
"""

import itertools
import math

import pytest
import torch

from experiments import data as datasets
from inference import ELBO, Runner, TrainConfig
from models.autoregressive.fvsbn import FVSBN, FVSBNConfig
from models.autoregressive.nade import NADE, NADEConfig
from models.base import DataError, DataSpec, DGMError
from models.nn.masked import order_degrees
from tests.helpers import fit_exact

pytestmark = pytest.mark.usefixtures("one_thread")


def binary(*shape):
    return DataSpec(tuple(shape), "binary")


def categorical(d, k):
    return DataSpec((d,), "categorical", num_levels=k)


def configurations(d, k=2):
    """Every point of ``{0..k-1}^d`` as a float tensor ``[k^d, d]``, in lexicographic order."""
    return torch.tensor(list(itertools.product(range(k), repeat=d)), dtype=torch.get_default_dtype())


def randomize_(model, scale=1.0):
    """Parameters far from their initial values, so conditionals differ from one another."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


def random_data(n, d, k=2):
    return torch.randint(0, k, (n, d)).to(torch.get_default_dtype())


# --- normalization ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        lambda: FVSBN(binary(8)),
        lambda: FVSBN(binary(2, 4), FVSBNConfig(order_seed=3)),
        lambda: NADE(binary(8), NADEConfig(hidden=5)),
        lambda: NADE(binary(2, 4), NADEConfig(hidden=16)),
    ],
    ids=["fvsbn", "fvsbn-random-order-2x4", "nade", "nade-2x4"],
)
def test_binary_models_normalize_over_all_256_configurations(float64, model):
    m = randomize_(model(), 1.5)
    x = configurations(8).reshape((256,) + m.data_spec.event_shape)
    total = m.log_prob(x).detach().exp().sum()
    assert abs(float(total) - 1.0) < 1e-6


def test_categorical_nade_normalizes_over_all_64_configurations(float64):
    m = randomize_(NADE(categorical(3, 4), NADEConfig(hidden=6)), 1.5)
    total = m.log_prob(configurations(3, 4)).detach().exp().sum()
    assert abs(float(total) - 1.0) < 1e-6


# --- causality ----------------------------------------------------------------------------------


def dependencies(fn, inputs):
    """``dep[i, j]``: output column ``i`` of ``fn(inputs)`` (``[B, D, ...]``) has a non-zero
    gradient w.r.t. input position ``j`` (``inputs`` is ``[B, D, ...]``) for some datapoint.
    Each output column is contracted with random weights so no term can cancel."""
    inputs = inputs.detach().clone().requires_grad_(True)
    out = fn(inputs)
    rows = []
    for i in range(out.shape[1]):
        (g,) = torch.autograd.grad((out[:, i] * torch.randn_like(out[:, i])).sum(), inputs, retain_graph=True)
        rows.append(g.abs().reshape(g.shape[0], g.shape[1], -1).sum((0, 2)) > 0)
    return torch.stack(rows)


def forbidden_edges(dep, degrees, allow_self=False):
    """``(i, j)`` where output ``i`` depends on an input ``j`` that is not strictly before it."""
    allowed = degrees[None, :] < degrees[:, None]
    if allow_self:
        allowed = allowed | torch.eye(len(degrees), dtype=torch.bool)
    return [tuple(e) for e in (dep & ~allowed).nonzero().tolist()]


def blind_outputs(dep, degrees):
    """Outputs ``i`` that have earlier inputs but depend on none of them."""
    before = degrees[None, :] < degrees[:, None]
    return [i for i in range(len(degrees)) if before[i].any() and not (dep[i] & before[i]).any()]


def assert_autoregressive(dep, degrees, allow_self=False):
    assert forbidden_edges(dep, degrees, allow_self) == []
    assert blind_outputs(dep, degrees) == []


def assert_invariant_to_later_inputs(logits_of, log_probs_of, x, degrees, k=2):
    """Changing ``x_j`` leaves the logits of every conditional ``i`` with ``j`` not before ``i``
    bit-for-bit unchanged, and its log-probability too when ``j`` is strictly after ``i``;
    it changes some conditional after ``j`` (if any)."""
    logits, log_probs = logits_of(x), log_probs_of(x)
    for j in range(x.shape[1]):
        y = x.clone()
        y[:, j] = (x[:, j] + torch.randint(1, k, (x.shape[0],)).to(x.dtype)) % k  # a different value
        later_logits, later_log_probs = logits_of(y), log_probs_of(y)
        for i in range(x.shape[1]):
            if degrees[j] >= degrees[i]:
                assert torch.equal(later_logits[:, i], logits[:, i]), (i, j)
            if degrees[j] > degrees[i]:
                assert torch.equal(later_log_probs[:, i], log_probs[:, i]), (i, j)
        if degrees[j] < len(degrees):
            after = degrees > degrees[j]
            assert not torch.equal(later_logits[:, after], logits[:, after]), j


@pytest.mark.parametrize("dim", [5, 9])
@pytest.mark.parametrize("order_seed", [None, 0, 1])
def test_fvsbn_is_autoregressive_in_its_order(float64, dim, order_seed):
    m = FVSBN(binary(dim), FVSBNConfig(order_seed=order_seed))
    deg = order_degrees(m.order)
    if order_seed is None:
        assert m.order.tolist() == list(range(dim))
    x = random_data(16, dim)
    assert_autoregressive(dependencies(m.conditional_logits, x), deg)
    # log p(x_i | x_<i) also depends on x_i itself (the value scored), and on nothing later
    dep = dependencies(m.conditional_log_probs, x)
    assert dep.diagonal().all()
    assert_autoregressive(dep, deg, allow_self=True)
    assert_invariant_to_later_inputs(m.conditional_logits, m.conditional_log_probs, x, deg)


@pytest.mark.parametrize("dim", [5, 9])
@pytest.mark.parametrize("hidden", [1, 3, 20])
def test_binary_nade_is_autoregressive(float64, dim, hidden):
    m = NADE(binary(dim), NADEConfig(hidden=hidden))
    deg = torch.arange(1, dim + 1)
    x = random_data(16, dim)

    def logits(x):
        return m.conditional_logits(m.input_features(x)).squeeze(-1)

    assert_autoregressive(dependencies(logits, x), deg)
    dep = dependencies(m.conditional_log_probs, x)
    assert dep.diagonal().all()
    assert_autoregressive(dep, deg, allow_self=True)
    assert_invariant_to_later_inputs(logits, m.conditional_log_probs, x, deg)


@pytest.mark.parametrize("dim", [5, 9])
@pytest.mark.parametrize("hidden", [3, 20])
def test_categorical_nade_is_autoregressive_through_the_one_hot_path(float64, dim, hidden):
    k = 4
    m = NADE(categorical(dim, k), NADEConfig(hidden=hidden))
    deg = torch.arange(1, dim + 1)
    x = random_data(16, dim, k)
    features = m.input_features(x)  # one-hot [B, D, K]; differentiate w.r.t. it as a relaxation
    assert torch.equal(features.argmax(-1).to(x.dtype), x) and torch.equal(features.sum(-1), torch.ones_like(x))
    assert_autoregressive(dependencies(m.conditional_logits, features), deg)

    def relaxed_log_probs(e):  # sum_k e_ik log p(x_i = k | x_<i); equals the log-probs at one-hots
        return (e * torch.log_softmax(m.conditional_logits(e), -1)).sum(-1)

    torch.testing.assert_close(relaxed_log_probs(features), m.conditional_log_probs(x), rtol=0, atol=1e-12)
    dep = dependencies(relaxed_log_probs, features)
    assert dep.diagonal().all()
    assert_autoregressive(dep, deg, allow_self=True)
    # and on the float levels themselves, through the real one-hot encoding
    assert_invariant_to_later_inputs(
        lambda x: m.conditional_logits(m.input_features(x)), m.conditional_log_probs, x, deg, k
    )


def test_the_checker_catches_a_leaking_fvsbn_mask(float64):
    m = FVSBN(binary(5), FVSBNConfig(order_seed=0))
    deg = order_degrees(m.order)
    i, j = int(m.order[1]), int(m.order[3])  # x_j is generated after x_i: forbidden
    leaky = m.linear.mask.clone()
    assert leaky[i, j] == 0
    leaky[i, j] = 1
    m.linear.set_mask(leaky)
    with torch.no_grad():
        m.linear.weight[i, j] = 1.0
    x = random_data(16, 5)
    assert forbidden_edges(dependencies(m.conditional_logits, x), deg) == [(i, j)]
    assert forbidden_edges(dependencies(m.conditional_log_probs, x), deg, allow_self=True) == [(i, j)]
    with pytest.raises(AssertionError):
        assert_invariant_to_later_inputs(m.conditional_logits, m.conditional_log_probs, x, deg)
    assert abs(float(m.log_prob(configurations(5)).detach().exp().sum()) - 1) > 1e-3  # and p no longer sums to 1


# --- the vectorized passes against loops written out by hand --------------------------------------


@pytest.mark.parametrize("order_seed", [None, 2])
def test_fvsbn_is_a_chain_of_logistic_regressions(float64, order_seed):
    d = 4
    m = randomize_(FVSBN(binary(d), FVSBNConfig(order_seed=order_seed)))
    w, b, order = m.linear.weight.tolist(), m.linear.bias.tolist(), m.order.tolist()
    x = configurations(d)
    expected = torch.empty_like(x)
    for n, row in enumerate(x.tolist()):
        for k, i in enumerate(order):  # p(x_i = 1 | earlier) = sigmoid(b_i + sum_earlier W_ij x_j)
            logit = b[i] + sum(w[i][j] * row[j] for j in order[:k])
            p = 1 / (1 + math.exp(-logit))
            expected[n, i] = math.log(p if row[i] == 1 else 1 - p)
    torch.testing.assert_close(m.conditional_log_probs(x), expected, rtol=0, atol=1e-12)
    with torch.no_grad():  # the masked-out half of W is not part of the model
        m.linear.weight.add_(1e3 * (1 - m.linear.mask))
    torch.testing.assert_close(m.conditional_log_probs(x), expected, rtol=0, atol=1e-12)


def naive_nade_log_probs(m, x):
    """The NADE recursion, one dimension at a time, recomputing ``a_i`` from scratch."""
    n, d = x.shape
    out = torch.empty_like(x)
    for i in range(d):
        a = m.c.expand(n, -1)
        for j in range(i):
            if m.data_spec.support == "binary":
                a = a + x[:, j : j + 1] * m.W[:, j]
            else:
                a = a + m.W[:, j, x[:, j].long()].T
        h = torch.sigmoid(a)
        if m.data_spec.support == "binary":
            p = torch.sigmoid(h @ m.V[i] + m.b[i])
            out[:, i] = torch.where(x[:, i] == 1, p.log(), (1 - p).log())
        else:
            log_p = torch.log_softmax(h @ m.V[i].T + m.b[i], -1)
            out[:, i] = log_p[torch.arange(n), x[:, i].long()]
    return out


@pytest.mark.parametrize("spec,k", [(binary(7), 2), (categorical(6, 5), 5)], ids=["binary", "categorical"])
def test_vectorized_nade_equals_the_naive_loop(float64, spec, k):
    m = randomize_(NADE(spec, NADEConfig(hidden=11)))
    shapes = {"binary": {"W": (11, 7), "V": (7, 11), "b": (7,)}, "categorical": {"W": (11, 6, 5), "V": (6, 5, 11)}}
    for name, shape in shapes[spec.support].items():
        assert tuple(getattr(m, name).shape) == shape
    x = random_data(32, spec.dim, k)
    with torch.no_grad():
        torch.testing.assert_close(m.conditional_log_probs(x), naive_nade_log_probs(m, x), rtol=0, atol=1e-10)


# --- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,k",
    [
        (lambda: FVSBN(binary(3), FVSBNConfig(order_seed=1)), 2),
        (lambda: NADE(binary(3), NADEConfig(hidden=4)), 2),
        (lambda: NADE(categorical(3, 3), NADEConfig(hidden=4)), 3),
    ],
    ids=["fvsbn", "nade", "nade-categorical"],
)
def test_sample_frequencies_match_exp_log_prob(float64, model, k):
    m = randomize_(model(), 1.5)
    n = 100_000
    samples = m.sample(n, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, 3) and samples.dtype == torch.float64
    m.check_data(samples, "samples")
    cells = (samples * torch.tensor([k * k, k, 1.0])).sum(-1).long()  # lexicographic index
    freq = torch.bincount(cells, minlength=k**3) / n
    p = m.log_prob(configurations(3, k)).exp().detach()
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * stderr).all(), (freq, p)


# --- training through the runner ----------------------------------------------------------------


def independent_nll(train, test, k):
    """Test NLL (nats) of independent per-pixel categoricals fitted to the training counts,
    with add-one smoothing so a level never seen in training has non-zero probability."""
    levels = torch.arange(k, dtype=train.dtype)
    counts = (train[..., None] == levels).sum(0) + 1.0  # [D, K]
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    return float(-log_p.gather(-1, test.long().T).sum(0).mean())


@pytest.mark.parametrize(
    "model,lr",
    [(lambda s: FVSBN(s), 1e-2), (lambda s: NADE(s, NADE.presets["small"]), 1e-2)],
    ids=["fvsbn", "nade"],
)
def test_training_on_binary_digits_beats_independent_bernoullis(model, lr):
    data = datasets.load("digits")
    baseline = independent_nll(data.train, data.test, 2)
    nll = fit_exact(model(data.spec), data, lr=lr)
    print(f"digits test NLL: {nll:.2f} nats vs independent Bernoulli {baseline:.2f}")
    assert nll < baseline - 5.0


def test_training_categorical_nade_on_digits17_beats_independent_categoricals():
    data = datasets.load("digits17")
    baseline = independent_nll(data.train, data.test, 17)
    nll = fit_exact(NADE(data.spec, NADE.presets["small"]), data, lr=3e-3)  # at 1e-2 it overfits 1,257 images
    print(f"digits17 test NLL: {nll:.2f} nats vs independent categorical {baseline:.2f}")
    assert nll < baseline - 10.0


# --- bad data ------------------------------------------------------------------------------------------


def test_wrong_support_is_rejected():
    with pytest.raises(DGMError, match="NADE"):
        FVSBN(categorical(4, 3))
    with pytest.raises(DGMError, match="binary"):
        FVSBN(DataSpec((4,), "real"))
    with pytest.raises(DGMError, match="RNADE"):
        NADE(DataSpec((4,), "real"))
    with pytest.raises(DGMError, match="hidden"):
        NADE(binary(4), NADEConfig(hidden=0))
    with pytest.raises(DataError, match="0, 1"):
        FVSBN(binary(3)).check_data(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(DataError, match="levels"):
        NADE(categorical(3, 4)).check_data(torch.tensor([[0.0, 4.0, 1.0]]))
    digits17 = datasets.load("digits17")
    with pytest.raises(DataError):  # grey levels 0..16 are not bits
        Runner(FVSBN(binary(64)), digits17, ELBO(1), config=TrainConfig(device="cpu", progress=False))
    with pytest.raises(DataError):  # nor levels 0..3
        Runner(NADE(categorical(64, 4)), digits17, ELBO(1), config=TrainConfig(device="cpu", progress=False))

"""PixelCNN and Gated PixelCNN: the mathematics, asserted.

* normalization: ``sum_x p(x) = 1`` by enumeration of every 2x4 binary and 2x2 3-level image;
* causality through gradients: the logits of pixel ``i`` have zero gradient in every input
  ``j >= i`` (raster order), over image sizes, kernels, depths and supports, and a first
  layer with mask B instead of A is caught;
* receptive fields, through gradients, equal to the exact prediction: for PixelCNN the
  Minkowski sum of the masks' supports, which misses a wedge of earlier pixels inside the
  nominal window (the blind spot); for Gated PixelCNN every earlier pixel in the rows above
  and to the left within reach (no blind spot);
* cached incremental sampling returns exactly the naive full-pass samples for one seed,
  with and without ``given``;
* sample frequencies (joint and conditional on a given top row) match exact probabilities;
* trained through the runner on 8x8 digits, both beat the best independent-pixel model.
"""

import itertools

import pytest
import torch
from torch import nn

from experiments.data import load
from models import MODELS as REGISTRY
from models.autoregressive.gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from models.autoregressive.pixelcnn import PixelCNN, PixelCNNConfig
from models.base import DataSpec, DGMError
from models.nn.conv import raster_mask
from tests.helpers import fit_exact

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [PixelCNN, GatedPixelCNN]
CONFIGS = {PixelCNN: PixelCNNConfig, GatedPixelCNN: GatedPixelCNNConfig}
DEPTH = {PixelCNN: "num_blocks", GatedPixelCNN: "num_layers"}


def make(cls, spec, channels=6, head=8, first=3, kernel=3, depth=2, spread=1.0, seed=0):
    """A model whose weights are N(0, spread^2 / fan_in)-ish: far enough from the default
    init that the conditionals are far from uniform and differ from each other."""
    config = CONFIGS[cls](channels=channels, head_channels=head, first_kernel=first, kernel=kernel)
    setattr(config, DEPTH[cls], depth)
    torch.manual_seed(seed)
    model = cls(spec, config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(spread)
    return model


def binary(h, w, flat=True):
    return DataSpec((h * w,), "binary", image_shape=(h, w)) if flat else DataSpec((h, w), "binary")


def levels(h, w, k, flat=True):
    if flat:
        return DataSpec((h * w,), "categorical", num_levels=k, image_shape=(h, w))
    return DataSpec((h, w), "categorical", num_levels=k)


def all_images(spec):
    k = spec.num_levels or 2
    grid = torch.tensor(list(itertools.product(range(k), repeat=spec.dim)), dtype=torch.get_default_dtype())
    return grid.reshape((-1,) + tuple(spec.event_shape))


def random_images(spec, n, seed=1):
    k = spec.num_levels or 2
    x = torch.randint(k, (n, spec.dim), generator=torch.Generator().manual_seed(seed))
    return x.to(torch.get_default_dtype()).reshape((n,) + tuple(spec.event_shape))


# --- normalization by enumeration ------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    "spec", [binary(2, 4), binary(2, 4, flat=False), levels(2, 2, 3)], ids=["2x4-bits", "2x4-bits-HW", "2x2-3-levels"]
)
def test_probabilities_sum_to_one(float64, cls, spec):
    model = make(cls, spec, spread=3.0)
    p = model.log_prob(all_images(spec)).exp()
    assert abs(p.sum().item() - 1) < 1e-12
    assert p.max() > 5 * p.min()  # not (near) uniform: the check has something to normalize


# --- causality through gradients --------------------------------------------------------------------


def dependencies(model, x, through="logits"):
    """``dep[i, j]``: the output of pixel ``i`` has a non-zero gradient in input pixel ``j``
    somewhere in the batch. ``through="logits"``: the conditional's logits, differentiated in
    the network's input maps (bits or one-hot levels); ``"log_probs"``: ``log p(x_i | x_<i)``
    differentiated in the bits ``x`` themselves."""
    if through == "logits":
        inputs = model.input_maps(x).requires_grad_(True)
        out = model.logit_maps(inputs).flatten(2)  # [B, L, D]
    else:
        inputs = x.reshape(x.shape[0], -1).clone().requires_grad_(True)
        out = model.conditional_log_probs(inputs).unsqueeze(1)
    rows = []
    for i in range(out.shape[-1]):
        (grad,) = torch.autograd.grad(out[..., i].sum(), inputs, retain_graph=True)
        rows.append(grad.abs().reshape(x.shape[0], -1, out.shape[-1]).sum((0, 1)) > 0)
    return torch.stack(rows)


def earlier(dim):
    """``before[i, j]``: pixel ``j`` comes strictly before pixel ``i`` in raster order."""
    idx = torch.arange(dim)
    return idx[None, :] < idx[:, None]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("shape", [(3, 4), (5, 5)], ids=["3x4", "5x5"])
@pytest.mark.parametrize("first, kernel", [(3, 3), (5, 1), (7, 5)], ids=["3-3", "5-1", "7-5"])
@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("support", ["binary", "categorical"])
def test_logits_depend_only_on_earlier_pixels(float64, cls, shape, first, kernel, depth, support):
    spec = binary(*shape) if support == "binary" else levels(*shape, 3)
    model = make(cls, spec, first=first, kernel=kernel, depth=depth)
    dep = dependencies(model, random_images(spec, 32))
    before = earlier(spec.dim)
    leaks = (dep & ~before).nonzero().tolist()
    assert leaks == [], f"logits of pixel i depend on pixel j >= i for (i, j) in {leaks}"
    assert dep[1:].any(-1).all(), "every pixel after the first is conditioned on some earlier one"
    if support == "binary":  # log p(x_i | x_<i) in x itself: x_i (the value scored) and earlier only
        dep_lp = dependencies(model, random_images(spec, 32), through="log_probs")
        assert not (dep_lp & ~before & ~torch.eye(spec.dim, dtype=torch.bool)).any()
        assert dep_lp.diagonal().all()


@pytest.mark.parametrize("cls", MODELS)
def test_a_first_layer_with_mask_b_is_caught(float64, cls):
    spec = binary(4, 5)
    model = make(cls, spec, first=5, depth=2)
    x = random_images(spec, 32)
    assert not (dependencies(model, x) & ~earlier(spec.dim)).any()
    if cls is PixelCNN:
        model.input_conv.mask = raster_mask((5, 5), (2, 2), include_center=True)
    else:
        model.blocks[0].horizontal.mask = torch.ones(1, 3)
    leaks = dependencies(model, x) & ~earlier(spec.dim)
    assert leaks.any()
    assert torch.equal(leaks, torch.eye(spec.dim, dtype=torch.bool))  # each pixel sees itself, nothing later


# --- receptive fields: PixelCNN's blind spot, and none in Gated PixelCNN ------------------------------------


def support_offsets(mask):
    """``{(dr, dc)}``: input offsets relative to the output that a centred ``k x k`` mask keeps."""
    p = mask.shape[0] // 2
    return {(r - p, c - p) for r, c in mask.nonzero().tolist()}


def minkowski(a, b):
    return {(r1 + r2, c1 + c2) for r1, c1 in a for r2, c2 in b}


def expected_dependencies(offsets, h, w):
    """``dep[i, j]`` for a translation-invariant set of input ``offsets`` of each output."""
    dep = torch.zeros(h * w, h * w, dtype=torch.bool)
    for r, c in itertools.product(range(h), range(w)):
        for dr, dc in offsets:
            if 0 <= r + dr < h and 0 <= c + dc < w:
                dep[r * w + c, (r + dr) * w + c + dc] = True
    return dep


@pytest.mark.parametrize("first, kernel, depth", [(3, 3, 2), (5, 3, 1), (3, 5, 1)])
def test_pixelcnn_receptive_field_has_a_blind_spot(float64, first, kernel, depth):
    """The receptive field of a stack of masked convs is the Minkowski sum of their supports:
    mask A once, then mask B once per residual block (the 1x1 convs and the skip add nothing).
    A mask-B step goes one column right only by going one row up, so the pixels one row up and
    more than ``first // 2`` columns to the right are never seen, although they precede the
    pixel and lie inside the nominal ``(first + 2 depth (kernel // 2))``-wide window."""
    h, w = 7, 9
    spec = binary(h, w)
    # 16 channels: with a handful, a ReLU unit dead on every input can cut a path that exists
    model = make(PixelCNN, spec, channels=16, first=first, kernel=kernel, depth=depth)
    offsets = support_offsets(raster_mask((first, first), (first // 2, first // 2), include_center=False))
    for _ in range(depth):
        offsets = minkowski(offsets, support_offsets(raster_mask((kernel, kernel), (kernel // 2,) * 2, True)))
    dep = dependencies(model, random_images(spec, 32))
    assert torch.equal(dep, expected_dependencies(offsets, h, w))

    reach = first // 2 + depth * (kernel // 2)  # the nominal window's half-width
    r, c = h - 1, 1  # a pixel with room above and to the right
    i = r * w + c
    blind = [(r - 1, cc) for cc in range(c + first // 2 + 1, min(w, c + reach + 1))]
    assert blind, "the configuration must have a blind spot inside the image"
    for rr, cc in blind:  # earlier pixels inside the nominal window with zero gradient
        assert not dep[i, rr * w + cc], (rr, cc)
    assert dep[i, (r - reach) * w + c + reach]  # while the window's far upper-right corner is seen


@pytest.mark.parametrize("first, kernel, depth", [(3, 3, 2), (5, 3, 1), (3, 5, 1), (7, 3, 0)])
def test_gated_pixelcnn_sees_every_earlier_pixel_within_reach(float64, first, kernel, depth):
    """With ``R = first // 2 + depth (kernel // 2)``, pixel ``(r, c)`` depends on exactly the
    pixels in rows ``r - 1 - R .. r - 1``, columns ``c - R .. c + R`` (vertical stack, shifted
    down one row) and in row ``r``, columns ``c - R .. c - 1`` (horizontal stack): every
    earlier pixel within reach, so no blind spot."""
    h, w = 7, 9
    spec = binary(h, w)
    model = make(GatedPixelCNN, spec, first=first, kernel=kernel, depth=depth)
    reach = first // 2 + depth * (kernel // 2)
    offsets = {(-a, b) for a in range(1, reach + 2) for b in range(-reach, reach + 1)}
    offsets |= {(0, -b) for b in range(1, reach + 1)}
    dep = dependencies(model, random_images(spec, 32))
    assert torch.equal(dep, expected_dependencies(offsets, h, w))
    r, c = h - 1, 1
    assert all(dep[r * w + c, (r - 1) * w + cc] for cc in range(max(0, c - reach), min(w, c + reach + 1)))


# --- cached sampling equals naive sampling ---------------------------------------------------------------


def given_top_rows(spec, n, rows, seed=5):
    """``[n, *event]``: the first ``rows`` image rows known (random levels), NaN below."""
    h, w = spec.image_shape or spec.event_shape
    given = random_images(spec, n, seed).reshape(n, h, w).clone()
    given[:, rows:] = float("nan")
    return given.reshape((n,) + tuple(spec.event_shape))


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    "spec", [binary(5, 6), binary(4, 3, flat=False), levels(4, 5, 4)], ids=["5x6-bits", "4x3-bits-HW", "4x5-4-levels"]
)
@pytest.mark.parametrize("with_given", [False, True], ids=["free", "given-top-rows"])
def test_cached_sampling_equals_naive_sampling(float64, cls, spec, with_given):
    model = make(cls, spec, first=5, depth=2, spread=2.0)
    n = 40
    given = given_top_rows(spec, n, rows=2) if with_given else None
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    cached = model.sample(n, given=given, generator=g())
    naive = model.sample(n, given=given, cached=False, generator=g())
    assert cached.shape == (n,) + tuple(spec.event_shape)
    assert torch.equal(cached, naive)
    assert len(cached.unique()) == (spec.num_levels or 2)  # a non-degenerate draw
    assert not torch.equal(cached, model.sample(n, given=given, generator=torch.Generator().manual_seed(12)))
    if with_given:
        known = ~given.isnan()
        assert torch.equal(cached[known], given[known])


@pytest.mark.parametrize("cls", MODELS)
def test_cached_sampling_never_runs_the_full_network(cls, monkeypatch):
    model = make(cls, binary(4, 4))
    monkeypatch.setattr(model, "logit_maps", lambda maps: pytest.fail("cached sampling ran a full forward pass"))
    assert model.sample(3).shape == (3, 16)


def test_given_after_an_unknown_pixel_is_refused():
    spec = binary(3, 3)
    given = torch.full((2, 9), float("nan"))
    given[:, 4] = 1.0  # the centre known, the top row not
    with pytest.raises(DGMError, match="before every unknown"):
        make(GatedPixelCNN, spec).sample(2, given=given)


# --- sample frequencies match the exact probabilities ---------------------------------------------------


def frequencies(samples, k):
    flat = samples.reshape(len(samples), -1).long()
    codes = (flat * k ** torch.arange(flat.shape[1] - 1, -1, -1)).sum(-1)
    return torch.bincount(codes, minlength=k ** flat.shape[1]).double() / len(samples)


def assert_within_5_stderr(freq, p, n):
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * stderr + 1e-12).all(), (freq, p)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("spec", [binary(2, 2), levels(1, 3, 3)], ids=["2x2-bits", "1x3-3-levels"])
def test_sample_frequencies_match_probabilities(float64, cls, spec):
    model = make(cls, spec, spread=2.5)
    n = 100_000
    samples = model.sample(n, generator=torch.Generator().manual_seed(3))
    p = model.log_prob(all_images(spec)).exp()
    assert p.max() > 3 * p.min()
    assert_within_5_stderr(frequencies(samples, spec.num_levels or 2), p, n)


@pytest.mark.parametrize("cls", MODELS)
def test_conditional_frequencies_given_the_top_row(float64, cls):
    """With the top row of a 2x2 image given, samples of the bottom row follow
    ``p(x_bottom | x_top) = p(x) / sum_{x_bottom} p(x)``."""
    spec = binary(2, 2)
    model = make(cls, spec, spread=2.5)
    n = 100_000
    given = torch.tensor([1.0, 0.0, float("nan"), float("nan")]).expand(n, 4)
    samples = model.sample(n, given=given, generator=torch.Generator().manual_seed(4))
    images = all_images(spec)
    joint = model.log_prob(images[(images[:, 0] == 1) & (images[:, 1] == 0)]).exp()  # x_bottom in 00, 01, 10, 11
    assert_within_5_stderr(frequencies(samples[:, 2:], 2), joint / joint.sum(), n)


# --- training through the runner -------------------------------------------------------------------------


def independent_nll(train, test, k):
    """Test NLL of the best independent model: Laplace-smoothed per-pixel level frequencies."""
    counts = nn.functional.one_hot(train.long(), k).sum(0) + 1.0
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    return -(nn.functional.one_hot(test.long(), k) * log_p).sum((1, 2)).mean().item()


# Measured (30 epochs, lr 1e-2, small presets, test NLL in nats over the 360 test digits):
#   digits    PixelCNN 21.0, Gated PixelCNN 19.6  vs  independent Bernoulli   25.3  (MADE small 21.1)
#   digits17  PixelCNN 91.1, Gated PixelCNN 87.3  vs  independent categorical 108.0 (MADE small 99.9)
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "cls, dataset, margin",
    [
        (PixelCNN, "digits", 3.0),
        (GatedPixelCNN, "digits17", 12.0),
        pytest.param(GatedPixelCNN, "digits", 3.0, marks=SLOW),
        pytest.param(PixelCNN, "digits17", 12.0, marks=SLOW),
    ],
)
def test_training_through_the_runner_beats_the_independent_model(cls, dataset, margin):
    data = load(dataset)
    nll = fit_exact(cls(data.spec, cls.presets["small"]), data, lr=1e-2)
    assert nll < independent_nll(data.train, data.test, data.spec.num_levels or 2) - margin, nll


# --- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    "spec, match",
    [
        (DataSpec((6,), "real", image_shape=(2, 3)), "binary or categorical"),
        (DataSpec((6,), "binary"), "image_shape"),
        (DataSpec((6,), "binary", image_shape=(2, 2)), "image_shape"),
        (DataSpec((2, 2, 2), "binary"), "single-channel"),
    ],
)
def test_bad_data_specs_are_refused(cls, spec, match):
    with pytest.raises(DGMError, match=match):
        cls(spec)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    "change", [dict(kernel=4), dict(first_kernel=1), dict(first_kernel=6), dict(channels=0), dict(head_channels=0)]
)
def test_bad_configs_are_refused(cls, change):
    with pytest.raises(DGMError):
        cls(binary(4, 4), CONFIGS[cls](**change))


@pytest.mark.parametrize("cls", MODELS)
def test_presets_build_on_mnist_and_are_registered(cls):
    spec = DataSpec((784,), "binary", image_shape=(28, 28))
    assert {"small", "mnist", "cpu"} <= set(cls.presets)
    for config in cls.presets.values():
        model = cls(spec, config)
        assert (model.height, model.width) == (28, 28)
    assert REGISTRY[cls.name] is cls
    x = random_images(spec, 2)
    assert model.log_prob(x).shape == (2,)

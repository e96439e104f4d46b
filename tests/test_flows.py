"""Normalizing flows (NICE, Real NVP, MAF): the mathematics, asserted.

* every invertible layer, with random (non-identity) parameters: the round trip in both
  directions, ``logdet_forward(x) = -logdet_inverse(f(x))``, and both equal to
  ``log|det J|`` of ``torch.autograd.functional.jacobian`` (act-norm after its data init,
  batch norm with random running statistics);
* whole models: ``log_prob`` is the change of variables of the full Jacobian; 2-D densities
  integrate to one on a grid; samples have the moments the density gives by quadrature;
* MAF's layers are autoregressive through gradients (a leaking mask is caught), and one
  MAF layer is exactly the Gaussian MADE density;
* act-norm's data init and batch norm's train/eval statistics do what they promise;
* the logit-space bits/dim helper on closed forms; training through the runner on moons;
  wrong data and settings are rejected.
"""

import copy
import json
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from experiments import data as datasets
from experiments.config import ModelConfig
from experiments.data import LOGIT_LAMBDA, logit_log_jacobian
from experiments.runs import build_model
from inference import ELBO, Runner, TrainConfig
from models import MODELS as REGISTRY
from models.base import DataSpec, DGMError
from models.flows import MAF, NICE, MAFConfig, NICEConfig, RealNVP, RealNVPConfig, logit_bits_per_dim
from models.flows.base import StandardLogistic
from models.flows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    BatchNormFlow,
    DiagonalScaling,
    MaskedAffineAutoregressive,
    Permutation,
    channel_mask,
    checkerboard_mask,
    coupling_mask,
    reverse,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def real(*shape, image_shape=None):
    return DataSpec(tuple(shape), "real", image_shape=image_shape)


def perturb(module, scale, seed=0):
    """Move every parameter off its (often identity) initial value by N(0, scale^2) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def random_batch_norm(dim, seed=0):
    """Batch norm with random affine parameters and running statistics, in eval mode."""
    layer = perturb(BatchNormFlow(dim), 0.5, seed)
    g = torch.Generator().manual_seed(seed + 100)
    layer.running_mean.copy_(torch.randn(dim, generator=g))
    layer.running_var.copy_(torch.rand(dim, generator=g) + 0.5)
    return layer.eval()


def data_initialized_act_norm(dim, seed=0):
    layer = ActNorm(dim)
    g = torch.Generator().manual_seed(seed)
    layer(3.0 * torch.randn(50, dim, generator=g) + torch.randn(dim, generator=g))  # the data init
    assert bool(layer.initialized) and layer.log_scale.abs().min() > 0.1
    return layer.eval()


# --- every layer: round trip, logdet symmetry, logdet = log|det J| --------------------------------

LAYERS = {
    "additive-alternating": (6, lambda: perturb(AdditiveCoupling(coupling_mask("alternating", 6, None, 0), (8,)), 0.5)),
    "additive-half": (5, lambda: perturb(AdditiveCoupling(coupling_mask("half", 5, None, 1), (8, 8), "tanh"), 0.5)),
    "affine-tanh-half": (6, lambda: perturb(AffineCoupling(coupling_mask("half", 6, None, 0), (8,)), 0.5)),
    "affine-exp-alternating": (
        5,
        lambda: perturb(AffineCoupling(coupling_mask("alternating", 5, None, 1), (8,), scale="exp"), 0.3),
    ),
    "affine-checkerboard": (16, lambda: perturb(AffineCoupling(checkerboard_mask((4, 4), 0), (12,)), 0.3)),
    "affine-channel": (18, lambda: perturb(AffineCoupling(channel_mask((2, 3, 3), 1), (12,)), 0.3)),
    "affine-channel-squeezed": (16, lambda: perturb(AffineCoupling(channel_mask((4, 4), 0), (12,)), 0.3)),
    "diagonal-scaling": (5, lambda: perturb(DiagonalScaling(5), 0.5)),
    "act-norm-data-init": (5, lambda: data_initialized_act_norm(5)),
    "batch-norm-eval": (5, lambda: random_batch_norm(5)),
    "permutation": (6, lambda: Permutation(torch.randperm(6, generator=torch.Generator().manual_seed(1)))),
    "reverse": (6, lambda: reverse(6)),
    "maf-natural": (5, lambda: perturb(MaskedAffineAutoregressive(5, (10, 10)), 0.3)),
    "maf-random-order": (
        6,
        lambda: perturb(MaskedAffineAutoregressive(6, (12,), torch.tensor([3, 0, 5, 1, 4, 2]), "tanh"), 0.3),
    ),
}


@pytest.fixture(params=list(LAYERS), ids=list(LAYERS))
def layer_and_x(request, float64):
    dim, make = LAYERS[request.param]
    torch.manual_seed(0)
    layer = make()
    layer.eval()
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return layer, x


def test_round_trip_in_both_directions(layer_and_x):
    layer, x = layer_and_x
    y, _ = layer(x)
    assert (y - x).abs().max() > 1e-3, "the layer is (near) the identity: the test would prove little"
    torch.testing.assert_close(layer.inverse(y)[0], x, atol=1e-10, rtol=0)
    z = torch.randn_like(x)
    torch.testing.assert_close(layer(layer.inverse(z)[0])[0], z, atol=1e-10, rtol=0)


def test_inverse_logdet_is_minus_forward_logdet(layer_and_x):
    layer, x = layer_and_x
    y, logdet = layer(x)
    x_back, logdet_inverse = layer.inverse(y)
    assert logdet.shape == logdet_inverse.shape == (x.shape[0],)
    torch.testing.assert_close(logdet_inverse, -logdet, atol=1e-10, rtol=0)


def log_abs_det_jacobians(fn, x):
    """``log|det d fn(v)/dv|`` at every row of ``x``, from the full Jacobian."""
    out = []
    for row in x:
        jac = jacobian(lambda v: fn(v[None])[0][0], row)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def test_logdets_equal_log_abs_det_of_the_autograd_jacobian(layer_and_x):
    layer, x = layer_and_x
    y, logdet = layer(x)
    torch.testing.assert_close(logdet, log_abs_det_jacobians(layer, x), atol=1e-8, rtol=0)
    torch.testing.assert_close(layer.inverse(y)[1], log_abs_det_jacobians(layer.inverse, y), atol=1e-8, rtol=0)


# --- masks and couplings ---------------------------------------------------------------------------


def test_masks_partition_the_coordinates():
    board = checkerboard_mask((4, 4), 0).reshape(4, 4)
    assert board[0, 0] and not board[0, 1] and not board[1, 0] and board[1, 1]
    for kind, dim, image in [("alternating", 7, None), ("half", 7, None), ("checkerboard", 18, (2, 3, 3))]:
        a, b = coupling_mask(kind, dim, image, 0), coupling_mask(kind, dim, image, 1)
        assert torch.equal(a, ~b) and 0 < a.sum() < dim
    two_channels = channel_mask((2, 3, 3), 0).reshape(2, 3, 3)
    assert two_channels[0].all() and not two_channels[1].any()
    squeezed = channel_mask((4, 4), 0).reshape(4, 4)  # top row of every 2x2 block
    assert squeezed[0].all() and not squeezed[1].any() and squeezed[2].all()


@pytest.mark.parametrize("coupling", [AdditiveCoupling, AffineCoupling])
def test_couplings_copy_the_kept_part_and_change_the_rest_as_a_function_of_it(float64, coupling):
    mask = checkerboard_mask((4, 4), 1)
    layer = perturb(coupling(mask, (12,)), 0.5)
    x = torch.randn(8, 16)
    y, _ = layer(x)
    assert torch.equal(y[:, mask], x[:, mask])
    jac = jacobian(lambda v: layer(v[None])[0][0], x[0])
    changed = ~mask
    # d y_B / d x_B is diagonal: the triangular structure that makes the determinant cheap
    block = jac[changed][:, changed]
    assert torch.equal(block, torch.diag(torch.diagonal(block)))
    assert jac[changed][:, mask].abs().sum() > 0  # ... and y_B does depend on x_A


# --- act-norm and batch norm -----------------------------------------------------------------------


def test_act_norm_standardizes_its_first_training_batch_only(float64):
    layer = ActNorm(3)
    x = torch.randn(200, 3) * torch.tensor([0.1, 2.0, 5.0]) + torch.tensor([1.0, -3.0, 0.0])
    layer.eval()
    assert torch.equal(layer(x)[0], x) and not bool(layer.initialized)  # eval never initializes
    layer.train()
    y, logdet = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-10, rtol=0)
    std = x.std(0, unbiased=False)
    torch.testing.assert_close(y.std(0, unbiased=False), std / (std + layer.eps), atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet[0], -torch.log(std + layer.eps).sum(), atol=1e-12, rtol=0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(5 * x + 1)  # a second batch trains nothing by itself: no re-initialization
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
    fresh = ActNorm(3)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)


def test_batch_norm_uses_batch_moments_in_training_and_running_averages_in_eval(float64):
    layer = BatchNormFlow(3, momentum=0.5)
    x = torch.randn(500, 3) * 3 + 2
    y, logdet = layer(x)  # training: standardized by this batch's moments
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    var = x.var(0, unbiased=False)
    torch.testing.assert_close(logdet[0], -0.5 * torch.log(var + layer.eps).sum(), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.running_mean, 0.5 * x.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * var, atol=1e-12, rtol=0)
    layer.eval()
    y_eval, _ = layer(x[:5])  # eval: running averages, so a datapoint's output is its own
    expected = (x[:5] - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(y_eval, expected, atol=1e-12, rtol=0)


def test_batch_norm_statistics_from_a_dataset_standardize_every_batch_norm_input(float64):
    model = random_model("maf-batch-norm", 3).train()
    x = torch.randn(400, 3) * 2 + 1
    model.set_batch_norm_statistics(x, chunk=64)
    assert model.training  # the mode is restored
    model.eval()
    h = x
    norms = 0
    for layer in model.transforms:
        if isinstance(layer, BatchNormFlow):
            norms += 1
            standardized = (h - layer.running_mean) / torch.sqrt(layer.running_var)
            torch.testing.assert_close(standardized.mean(0), torch.zeros(3), atol=1e-10, rtol=0)
            torch.testing.assert_close(standardized.var(0, unbiased=False), torch.ones(3), atol=1e-10, rtol=0)
        h = layer(h)[0]
    assert norms == 2


def test_the_runner_ends_fit_with_batch_norm_statistics_of_the_training_set():
    data = datasets.load("moons")
    torch.manual_seed(0)
    model = MAF(data.spec, MAFConfig(layers=2, hidden=(8,), batch_norm=True))
    config = TrainConfig(epochs=1, max_steps=20, batch_size=100, device="cpu", progress=False, validate=False)
    Runner(model, data, ELBO(1), config=config).fit()
    expected = copy.deepcopy(model)
    expected.set_batch_norm_statistics(data.train)
    for (name, got), (_, want) in zip(model.named_buffers(), expected.named_buffers()):
        assert torch.equal(got, want), name
    first = next(layer for layer in model.transforms if isinstance(layer, BatchNormFlow))
    assert first.running_mean.abs().max() > 0  # not the initial statistics


# --- MAF: autoregressive through gradients ---------------------------------------------------------


def future_dependence(layer, x):
    """``(leak, diagonal, past)``: the largest |d u_i / d x_j| over ``j`` after ``i`` in the
    layer's order (must be 0), the smallest |d u_i / d x_i| (must be > 0), and the number of
    (i, j before i) pairs with any dependence."""
    order = layer.made.order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    jac = torch.stack([jacobian(lambda v: layer(v[None])[0][0], row) for row in x]).abs().amax(0)  # [i, j]
    after = rank[None, :] > rank[:, None]  # after[i, j]: j comes after i
    before = rank[None, :] < rank[:, None]
    return float(jac[after].max()), float(torch.diagonal(jac).min()), int((jac[before] > 0).sum())


@pytest.mark.parametrize("dim", [3, 6])
@pytest.mark.parametrize("hidden", [(16,), (16, 16)], ids=["1-layer", "2-layers"])
@pytest.mark.parametrize("order", ["natural", "reversed", "random"])
def test_maf_layer_outputs_depend_only_on_earlier_inputs(float64, dim, hidden, order):
    orders = {
        "natural": torch.arange(dim),
        "reversed": torch.arange(dim).flip(0),
        "random": torch.randperm(dim, generator=torch.Generator().manual_seed(dim)),
    }
    layer = perturb(MaskedAffineAutoregressive(dim, hidden, orders[order]), 0.5)
    x = torch.randn(8, dim)
    leak, diagonal, past = future_dependence(layer, x)
    assert leak == 0.0, "u_i depends on an x_j later in the order"
    assert diagonal > 0
    assert past == dim * (dim - 1) // 2, "some u_i ignores an earlier x_j"


def test_a_leaking_maf_mask_is_detected(float64):
    layer = perturb(MaskedAffineAutoregressive(5, (20,)), 0.5)
    x = torch.randn(8, 5)
    assert future_dependence(layer, x)[0] == 0.0
    layer.made.layers[-1].mask.fill_(1.0)  # the output layer now sees every hidden unit
    assert future_dependence(layer, x)[0] > 0


def test_one_maf_layer_is_the_gaussian_made_density(float64):
    model = perturb(MAF(real(4), MAFConfig(layers=1, hidden=(10,), batch_norm=False)), 0.5)
    x = torch.randn(16, 4)
    mu, alpha = model.transforms[0].made(x)
    expected = torch.distributions.Normal(mu, alpha.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(model.log_prob(x), expected, atol=1e-12, rtol=0)


# --- whole models: change of variables, normalization, samples -----------------------------------

MODELS = {  # tanh conditioners: bounded shifts and log-scales, so tails stay those of the base
    "nice-logistic": lambda spec: NICE(spec, NICEConfig(couplings=4, hidden=(8, 8), activation="tanh")),
    "nice-gaussian-half": lambda spec: NICE(
        spec, NICEConfig(couplings=3, hidden=(8,), activation="tanh", mask="half", base="gaussian")
    ),
    "realnvp-batch-norm": lambda spec: RealNVP(spec, RealNVPConfig(couplings=4, hidden=(8, 8), activation="tanh")),
    "realnvp-act-norm-exp": lambda spec: RealNVP(
        spec, RealNVPConfig(couplings=3, hidden=(8,), activation="tanh", norm="act", scale="exp")
    ),
    "maf-batch-norm": lambda spec: MAF(spec, MAFConfig(layers=3, hidden=(8, 8), activation="tanh")),
    "maf-same-order": lambda spec: MAF(
        spec, MAFConfig(layers=2, hidden=(8,), activation="tanh", reverse=False, batch_norm=False)
    ),
}


def random_model(name, dim, seed=0, scale=0.3):
    """A model with random weights, random batch-norm statistics and initialized act-norms,
    in eval mode (so every layer is a fixed function of its input)."""
    torch.manual_seed(seed)
    model = perturb(MODELS[name](real(dim)), scale, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.transforms:
        if isinstance(layer, BatchNormFlow):
            layer.running_mean.copy_(0.3 * torch.randn(dim, generator=g))
            layer.running_var.copy_(torch.rand(dim, generator=g) + 0.5)
        if isinstance(layer, ActNorm):
            layer.initialized.fill_(True)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_log_prob_is_the_change_of_variables_of_the_whole_flow(float64, name):
    model = random_model(name, 4)
    x = torch.randn(5, 4)
    z, _ = model.to_noise(x)
    expected = model.base.log_prob(z) + log_abs_det_jacobians(lambda v: (model.to_noise(v)[0],), x)
    torch.testing.assert_close(model.log_prob(x), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(model.to_data(z)[0], x, atol=1e-10, rtol=0)


def grid_density(model, half_width, n):
    """``(grid, p(x) on the grid, p_base(f(x)) on the grid)``: the density, and the same
    change of variables without its log-determinants (not a density)."""
    grid = torch.linspace(-half_width, half_width, n)
    g0, g1 = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        z, logdet = model.to_noise(torch.stack([g0.reshape(-1), g1.reshape(-1)], -1))
        log_base = model.base.log_prob(z)
    return grid, (log_base + logdet).exp().reshape(n, n), log_base.exp().reshape(n, n)


GRID = (20.0, 601)  # half-width and points: tanh conditioners keep every density well inside


def integral(grid, values):
    return float(torch.trapezoid(torch.trapezoid(values, grid, dim=1), grid))


@pytest.mark.parametrize("name", list(MODELS))
def test_two_dimensional_density_integrates_to_one(float64, name):
    model = random_model(name, 2, seed=3)
    grid, density, without_logdet = grid_density(model, *GRID)
    assert density[[0, -1]].max() < 1e-7 and density[:, [0, -1]].max() < 1e-7, "mass beyond the grid"
    assert abs(integral(grid, density) - 1.0) < 1e-6
    assert abs(integral(grid, without_logdet) - 1.0) > 1e-2  # the check has teeth


@pytest.mark.parametrize("name", ["nice-logistic", "realnvp-batch-norm", "maf-batch-norm"])
def test_samples_have_the_moments_of_the_density(float64, name):
    model = random_model(name, 2, seed=4)
    n = 40_000
    x = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    grid, density, _ = grid_density(model, *GRID)
    g0, g1 = torch.meshgrid(grid, grid, indexing="ij")
    for label, f_grid, f_samples in [
        ("E[x0]", g0, x[:, 0]),
        ("E[x1]", g1, x[:, 1]),
        ("E[x0 x1]", g0 * g1, x[:, 0] * x[:, 1]),
        ("E[tanh(x0 - x1)]", torch.tanh(g0 - g1), torch.tanh(x[:, 0] - x[:, 1])),  # smooth: exact quadrature
    ]:
        exact, mean = integral(grid, density * f_grid), float(f_samples.mean())
        stderr = float(f_samples.std()) / math.sqrt(n)
        assert abs(mean - exact) < 4 * stderr, f"{label}: samples {mean:.4f} vs density {exact:.4f}"


def test_logistic_base_samples_follow_its_cdf(float64):
    base = StandardLogistic()
    n = 50_000
    z = base.sample((n,), generator=torch.Generator().manual_seed(0)).sort().values
    cdf = torch.sigmoid(z)
    ranks = torch.arange(1, n + 1, dtype=cdf.dtype)
    ks = float(torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max())
    assert ks < 1.95 / math.sqrt(n)
    grid = torch.linspace(-40, 40, 8001)
    assert abs(float(torch.trapezoid(base.log_prob(grid[:, None]).exp(), grid)) - 1) < 1e-6


def test_the_pyro_program_is_one_observed_site_with_the_exact_density(float64):
    model = random_model("maf-batch-norm", 4)
    x = torch.randn(6, 4)
    bound = ELBO(1).bound(model.model, model.guide, x)
    torch.testing.assert_close(bound, model.log_prob(x), atol=1e-10, rtol=0)


# --- bits per dimension ------------------------------------------------------------------------------


def test_logit_bits_per_dim_on_closed_forms(float64):
    d = 12
    x = torch.rand(5, d, generator=torch.Generator().manual_seed(0))
    y = torch.logit(LOGIT_LAMBDA + (1 - 2 * LOGIT_LAMBDA) * x)
    uniform = -logit_log_jacobian(y)  # log p_y(y) when x is uniform on the unit cube
    torch.testing.assert_close(logit_bits_per_dim(uniform, y), torch.full((5,), 8.0), atol=1e-10, rtol=0)
    doubled = uniform + d * math.log(2)  # twice the density: one bit per dimension less
    torch.testing.assert_close(logit_bits_per_dim(doubled, y), torch.full((5,), 7.0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("zero_init, stuck", [(True, True), (None, False)], ids=["zero-init", "default"])
def test_nice_does_not_start_at_the_stationary_point_of_symmetric_data(float64, zero_init, stuck):
    """With a zero shift and data symmetric in x_1 given x_0, d log p / d t cancels in pairs:
    a zero-initialized additive coupling would never move (rings). NICE's default does not."""
    model = NICE(real(2), NICEConfig(couplings=1, hidden=(8,)))
    model.transforms[0] = AdditiveCoupling(coupling_mask("alternating", 2, None, 0), (8,), zero_init=zero_init)
    x = torch.randn(64, 2)
    symmetric = torch.cat([x, x * torch.tensor([1.0, -1.0])])
    model.log_prob(symmetric).sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.transforms[0].parameters()]).abs().max()
    assert (grad < 1e-12) if stuck else (grad > 1e-3)


# --- training and configuration --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nice", "realnvp", "maf"])
def test_training_through_the_runner_beats_the_best_gaussian_on_moons(name):
    data = datasets.load("moons")
    mean, cov = data.train.mean(0), torch.cov(data.train.T, correction=0)  # maximum likelihood
    gaussian = float(torch.distributions.MultivariateNormal(mean, cov).log_prob(data.val).mean())
    torch.manual_seed(0)
    model = REGISTRY[name](data.spec, REGISTRY[name].presets["toy"])
    with torch.no_grad():
        before = float(model.eval().log_prob(data.val).mean())
    model.train()
    config = TrainConfig(epochs=1, max_steps=150, batch_size=100, lr=3e-3, device="cpu", progress=False)
    runner = Runner(model, data, ELBO(1), config=config)
    runner.fit()
    with torch.no_grad():
        after = float(model.eval().log_prob(data.val).mean())
    print(f"{name}: moons validation log-likelihood {before:.3f} -> {after:.3f} nats (Gaussian {gaussian:.3f})")
    assert after > gaussian + 0.1 > before  # it starts near N(0, I) and ends beyond any Gaussian
    samples = model.sample(500)
    assert samples.shape == (500, 2) and torch.isfinite(samples).all()


@pytest.mark.parametrize("cls", [NICE, RealNVP, MAF])
def test_presets_build_and_registry_names_resolve(cls):
    for preset in ("small", "toy", "mnist", "mnist-cpu"):
        assert preset in cls.presets
    assert REGISTRY[cls.name] is cls
    model = build_model(ModelConfig(name=cls.name, preset="small"), real(2))
    assert isinstance(model, cls) and model.has_exact_log_prob


@pytest.mark.parametrize("cls", [NICE, RealNVP, MAF])
def test_discrete_data_is_rejected(cls):
    with pytest.raises(DGMError, match="real"):
        cls(DataSpec((4,), "binary"))
    with pytest.raises(DGMError, match="real"):
        cls(DataSpec((4,), "categorical", num_levels=3))
    digits = datasets.load("digits")  # binary images: the CLI builds the model for the data's spec
    with pytest.raises(DGMError, match="real"):
        build_model(ModelConfig(name=cls.name, preset="small"), digits.spec)


def test_bad_settings_are_rejected():
    with pytest.raises(DGMError, match="image"):
        RealNVP(real(6), RealNVPConfig(mask="checkerboard"))
    with pytest.raises(DGMError, match="even height"):
        RealNVP(real(15, image_shape=(5, 3)), RealNVPConfig(mask="channel"))
    with pytest.raises(DGMError, match="unknown mask"):
        NICE(real(4), NICEConfig(mask="diagonal"))
    with pytest.raises(DGMError, match="norm"):
        RealNVP(real(4), RealNVPConfig(norm="layer"))
    with pytest.raises(DGMError, match="scale"):
        RealNVP(real(4), RealNVPConfig(scale="sigmoid"))
    with pytest.raises(DGMError, match="base"):
        MAF(real(4), MAFConfig(base="cauchy"))
    with pytest.raises(DGMError, match="dimension >= 2"):
        NICE(real(1))
    with pytest.raises(DGMError, match="hidden"):
        MAF(real(4), MAFConfig(hidden=()))
    with pytest.raises(DGMError, match="layers"):
        MAF(real(4), MAFConfig(layers=0))
    with pytest.raises(DGMError, match="permutation"):
        Permutation(torch.tensor([0, 0, 1]))


# --- density plots ------------------------------------------------------------------------------------


def test_density_plot_grid_holds_the_mass_and_the_png_is_written(tmp_path, float64):
    from experiments.density_plots import density_on_grid, save_density_plot

    model = random_model("realnvp-batch-norm", 2, seed=3)
    xs, ys, density = density_on_grid(model, (-20.0, 20.0, -20.0, 20.0), resolution=400)
    assert abs(float(density.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])) - 1) < 1e-3
    # rows are y: the grid value at (x, y) is p(x, y)
    i, j = 123, 301
    expected = model.log_prob(torch.tensor([[float(xs[j]), float(ys[i])]])).exp()
    torch.testing.assert_close(density[i, j].double(), expected[0], rtol=1e-5, atol=0)
    path = save_density_plot(model, tmp_path / "density.png", data=torch.randn(500, 2), n_samples=300)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DGMError, match="2-D"):
        density_on_grid(MAF(real(3), MAFConfig(layers=1, hidden=(4,))), (-1.0, 1.0, -1.0, 1.0))


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_dgm_trains_a_flow_on_moons_and_draws_its_density(tmp_path, one_thread):
    from experiments.cli import main

    run = tmp_path / "realnvp"
    args = ["train", "realnvp", "--preset", "small", "--data", "moons", "--epochs", "1", "--max-steps", "5"]
    assert main(args + ["--no-progress", "--run-dir", str(run)]) == 0
    summary = _strict_json((run / "summary.json").read_text())  # no NaN / Infinity tokens
    assert summary["test"]["estimator"] == "exact" and summary["test"]["elbo"] is None
    png = (run / "density.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert main(["density", str(run), "--out", str(tmp_path / "d.png"), "--split", "test"]) == 0
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")
    vae = tmp_path / "vae"
    assert (
        main(
            [
                "train",
                "vae",
                "--preset",
                "small",
                "--data",
                "digits",
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--eval-k",
                "2",
                "--no-progress",
                "--run-dir",
                str(vae),
            ]
        )
        == 0
    )
    assert main(["density", str(vae)]) == 2  # not 2-D: one line, no traceback


def test_summary_bits_per_dim_is_the_mean_of_the_per_image_bits(float64):
    from experiments.reporting import logit_bits_per_dim as summary_bits_per_dim

    g = torch.Generator().manual_seed(0)
    y = torch.randn(30, 784, generator=g) * 3
    log_p = -1000 + 50 * torch.randn(30, generator=g)
    per_image = logit_bits_per_dim(log_p, y)
    got = summary_bits_per_dim(float(-log_p.mean()), y)
    assert got == pytest.approx(float(per_image.mean()), rel=1e-12)
    assert summary_bits_per_dim(float(-log_p[:10].mean()), y[:10]) == pytest.approx(
        float(per_image[:10].mean()), rel=1e-12
    )

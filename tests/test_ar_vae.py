"""VAE with an autoregressive decoder (``models/latent/ar_vae.py``) and the conditioning input
of its decoders: the mathematics, asserted.

* the conditional decoders (PixelCNN, Gated PixelCNN, char-RNN with ``context_dim > 0``) are
  causal in ``x`` through the gradients (a mask-B first layer / unshifted inputs is caught),
  and every conditional depends on the context ``z`` (non-zero gradient in ``z``);
* without a context the decoders are the same models as before the conditioning input was
  added: the log-probabilities and samples recorded from the code before the change, and no
  new parameters;
* ``sum_x p(x | z) = 1`` by enumeration of every 2x3 image / 3-level 2x2 image / short string,
  for several fixed ``z``, and ``p(x | z)`` really changes with ``z``;
* cached conditional sampling equals the full-pass reference; the char-RNN's one-step path
  gives the teacher-forced logits;
* the observed site's distribution broadcasts ``[K, B]`` latents against ``[B]`` datapoints
  exactly like a loop over them, at any chunk size;
* with one latent dimension ``log p(x)`` is computed by Gauss-Hermite quadrature:
  ``E[ELBO] <= E[IWAE_k] <= E[IWAE_2k] <= log p(x)``, and importance sampling with large K
  recovers ``log p(x)``;
* free bits: each latent dimension's KL term in the trained loss is ``max(lambda, mean KL_j)``
  (never below ``lambda``), the difference to the plain ELBO loss, exactly, and a floored
  dimension's KL sends no gradient;
* (slow) every run of ``dgm reproduce ar-vae`` goes through ``train_run`` and the report.
"""

import itertools
import math
from dataclasses import replace

import pyro
import pytest
import torch

from experiments import data as datasets
from experiments.reproduce import EXPERIMENTS, TINY, ar_vae_report
from experiments.runs import train_run
from inference.config import ObjectiveConfig
from inference.estimators import estimate_dataset
from inference.logweights import LogWeights, compute_log_weights
from inference.objective import make_objective
from inference.objectives import ELBO, IWAE
from inference.schedules import make_schedule
from models import MODELS
from models.autoregressive.charrnn import CharRNN, CharRNNConfig
from models.autoregressive.gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from models.autoregressive.pixelcnn import PixelCNN, PixelCNNConfig
from models.autoregressive.sequence import num_symbols
from models.base import DataSpec, DGMError
from models.latent.ar_vae import ARVAE, PRESETS, ARVAEConfig, ConditionalAutoregressiveDistribution
from models.nn.conv import raster_mask

pytestmark = pytest.mark.usefixtures("one_thread")

PIXEL_MODELS = [PixelCNN, GatedPixelCNN]
DEPTH = {PixelCNN: "num_blocks", GatedPixelCNN: "num_layers"}
CONFIGS = {PixelCNN: PixelCNNConfig, GatedPixelCNN: GatedPixelCNNConfig}


def image_spec(h, w, levels=None):
    if levels is None:
        return DataSpec((h * w,), "binary", image_shape=(h, w))
    return DataSpec((h * w,), "categorical", num_levels=levels, image_shape=(h, w))


def tokens_spec(vocab, length):
    return DataSpec((length,), "categorical", num_levels=vocab)


def spread_(model, spread):
    """Scale every weight: conditionals far from uniform, and far from each other."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(spread)
    return model


def pixel_decoder(cls, spec, context_dim, first=3, kernel=3, depth=2, spread=1.0, seed=0):
    config = CONFIGS[cls](channels=6, head_channels=8, first_kernel=first, kernel=kernel)
    setattr(config, DEPTH[cls], depth)
    torch.manual_seed(seed)
    return spread_(cls(spec, config, context_dim=context_dim), spread)


def rnn_decoder(spec, context_dim, cell="lstm", layers=1, spread=1.0, seed=0):
    torch.manual_seed(seed)
    model = CharRNN(spec, CharRNNConfig(cell=cell, embedding=6, hidden=10, layers=layers), context_dim=context_dim)
    return spread_(model, spread).eval()


def all_images(spec):
    k = spec.num_levels or 2
    return torch.tensor(list(itertools.product(range(k), repeat=spec.dim)), dtype=torch.get_default_dtype())


def all_strings(vocab, length):
    """Every END-padded string of at most ``length - 1`` characters over tokens 1..vocab-1."""
    rows = [list(c) + [0] * (length - n) for n in range(length) for c in itertools.product(range(1, vocab), repeat=n)]
    return torch.tensor(rows, dtype=torch.get_default_dtype())


def random_rows(n, dim, levels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(levels, (n, dim), generator=g).to(torch.get_default_dtype())


def contexts(n, dim, seed=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# --- causality in x, dependence on z ------------------------------------------------------------------


def jacobian_pattern(out, inputs, context, by_position):
    """``(dep [D, D], on_z [D])``: ``dep[i, j]``, output position ``i`` has a non-zero gradient
    in input position ``j``; ``on_z[i]``, in the context. ``out [B, C, D]``; ``by_position``
    lays a gradient in ``inputs`` out as ``[B, C', D]``."""
    dep, on_z = [], []
    for i in range(out.shape[-1]):
        g_x, g_z = torch.autograd.grad(out[..., i].sum(), (inputs, context), retain_graph=True)
        dep.append(by_position(g_x).abs().sum((0, 1)) > 0)
        on_z.append(bool(g_z.abs().sum() > 0))
    return torch.stack(dep), torch.tensor(on_z)


def pixel_pattern(model, x, h):
    inputs = model.input_maps(x).requires_grad_(True)
    h = h.clone().requires_grad_(True)
    return jacobian_pattern(model.logit_maps(inputs, h).flatten(2), inputs, h, lambda g: g.flatten(2))


def rnn_pattern(model, x, h):
    features = model.sequence.features(x).requires_grad_(True)  # [B, T, V]
    h = h.clone().requires_grad_(True)
    return jacobian_pattern(model.logits(features, h).transpose(1, 2), features, h, lambda g: g.transpose(1, 2))


def strictly_before(dim):
    idx = torch.arange(dim)
    return idx[None, :] < idx[:, None]


@pytest.mark.parametrize("cls", PIXEL_MODELS)
@pytest.mark.parametrize("shape", [(3, 4), (4, 4)], ids=["3x4", "4x4"])
@pytest.mark.parametrize("first, kernel, depth", [(3, 3, 0), (5, 3, 2), (3, 1, 1)])
@pytest.mark.parametrize("levels", [None, 3], ids=["bits", "3-levels"])
def test_conditional_pixel_decoders_are_causal_in_x_and_depend_on_z(float64, cls, shape, first, kernel, depth, levels):
    spec = image_spec(*shape, levels)
    model = pixel_decoder(cls, spec, context_dim=3, first=first, kernel=kernel, depth=depth)
    dep, on_z = pixel_pattern(model, random_rows(16, spec.dim, levels or 2), contexts(16, 3))
    leaks = (dep & ~strictly_before(spec.dim)).nonzero().tolist()
    assert leaks == [], f"logits of pixel i depend on pixel j >= i for (i, j) in {leaks}"
    assert dep[1:].any(-1).all()  # conditioned on earlier pixels
    assert on_z.all(), "every pixel's conditional must depend on z"


@pytest.mark.parametrize("cls", PIXEL_MODELS)
def test_a_conditional_pixel_decoder_with_a_mask_b_first_layer_is_caught(float64, cls):
    spec = image_spec(4, 5)
    model = pixel_decoder(cls, spec, context_dim=2, first=5)
    x, h = random_rows(16, spec.dim, 2), contexts(16, 2)
    assert not (pixel_pattern(model, x, h)[0] & ~strictly_before(spec.dim)).any()
    if cls is PixelCNN:
        model.input_conv.mask = raster_mask((5, 5), (2, 2), include_center=True)
    else:
        model.blocks[0].horizontal.mask = torch.ones(1, 3)
    leaks = pixel_pattern(model, x, h)[0] & ~strictly_before(spec.dim)
    assert torch.equal(leaks, torch.eye(spec.dim, dtype=torch.bool))  # each pixel sees itself


@pytest.mark.parametrize("cell, layers", [("lstm", 1), ("lstm", 2), ("gru", 2)])
def test_conditional_rnn_is_causal_in_x_and_depends_on_z(float64, cell, layers):
    spec = tokens_spec(4, 6)
    model = rnn_decoder(spec, context_dim=3, cell=cell, layers=layers)
    x, h = random_rows(16, 6, 4), contexts(16, 3)
    dep, on_z = rnn_pattern(model, x, h)
    assert torch.equal(dep, strictly_before(6)), "position t must read exactly x_<t"
    assert on_z.all(), "every position (the first included) must depend on z"
    model.embed.forward = lambda features: model.embed.proj(features)  # a leak: inputs not shifted
    assert rnn_pattern(model, x, h)[0].diagonal().all()


# --- no context: the models of before ------------------------------------------------------------------

# Recorded from the code before the conditioning input existed (float64, torch.manual_seed(0)
# before construction; the data and generators as in `_reference_models`).
REFERENCE = {
    "pixelcnn": (
        [-14.124842953819734, -13.61019779980663, -14.189256185157335],
        [[0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1],
         [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1],
         [1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0],
         [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0]],
    ),
    "gated": (
        [-13.79666285496874, -14.004862166239239, -13.654557512025645],
        [[0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1],
         [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1],
         [1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0],
         [0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0]],
    ),
    "charrnn": (
        [-5.601258045737083, -6.84496913904199, -1.5492838799352673],
        [[1, 3, 1, 3, 0, 0], [2, 1, 3, 2, 2, 0], [2, 3, 1, 0, 0, 0], [3, 2, 2, 1, 2, 0]],
    ),
}


def _reference_models(kind):
    img, tok = image_spec(4, 5), tokens_spec(4, 6)
    torch.manual_seed(0)
    if kind == "pixelcnn":
        model = PixelCNN(img, PixelCNNConfig(channels=6, num_blocks=2, first_kernel=3, kernel=3, head_channels=8))
    elif kind == "gated":
        model = GatedPixelCNN(img, GatedPixelCNNConfig(channels=6, num_layers=2, first_kernel=3, kernel=3,
                                                       head_channels=8))
    else:
        model = CharRNN(tok, CharRNNConfig(embedding=6, hidden=10, layers=2)).eval()
    if kind == "charrnn":
        x = torch.tensor([[1, 2, 3, 0, 0, 0], [3, 3, 1, 2, 1, 0], [0] * 6], dtype=torch.float64)
    else:
        x = torch.randint(2, (3, 20), generator=torch.Generator().manual_seed(1)).double()
    return model, x


@pytest.mark.parametrize("kind", REFERENCE)
def test_without_context_the_decoders_are_the_models_of_before(float64, kind):
    model, x = _reference_models(kind)
    assert not any("context" in name for name in model.state_dict())  # no new parameters
    log_p, samples = REFERENCE[kind]
    torch.testing.assert_close(model.log_prob(x), torch.tensor(log_p), rtol=0, atol=1e-12)
    drawn = model.sample(4, generator=torch.Generator().manual_seed(2))
    assert drawn.long().tolist() == samples


@pytest.mark.parametrize("make", [
    lambda: pixel_decoder(PixelCNN, image_spec(2, 2), 0),
    lambda: pixel_decoder(GatedPixelCNN, image_spec(2, 2), 2),
    lambda: rnn_decoder(tokens_spec(3, 4), 2),
])
def test_context_is_checked(make):
    model = make()
    n = 3
    x = torch.zeros(n, model.data_spec.dim)
    if model.context_dim == 0:
        with pytest.raises(DGMError, match="without conditioning"):
            model.log_prob(x, context=torch.zeros(n, 2))
        return
    for bad in (None, torch.zeros(n, model.context_dim + 1), torch.zeros(n + 1, model.context_dim)):
        with pytest.raises(DGMError, match="is conditional"):
            model.log_prob(x, context=bad)
        with pytest.raises(DGMError, match="is conditional"):
            model.sample(n, context=bad)


# --- normalization of p(x | z) by enumeration ------------------------------------------------------


@pytest.mark.parametrize("cls", PIXEL_MODELS)
@pytest.mark.parametrize("spec", [image_spec(2, 3), image_spec(2, 2, levels=3)], ids=["2x3-bits", "2x2-3-levels"])
def test_pixel_decoder_normalizes_for_every_fixed_z(float64, cls, spec):
    model = pixel_decoder(cls, spec, context_dim=2, spread=3.0)
    x = all_images(spec)
    probs = []
    for z in contexts(3, 2, seed=5):
        p = model.log_prob(x, context=z.expand(len(x), -1)).exp()
        assert abs(p.sum().item() - 1) < 1e-12
        probs.append(p)
    assert (probs[0] - probs[1]).abs().max() > 1e-2  # p(x | z) depends on z


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_decoder_normalizes_over_strings_for_every_fixed_z(float64, cell):
    model = rnn_decoder(tokens_spec(3, 4), context_dim=2, cell=cell, spread=2.0)
    x = all_strings(3, 4)
    probs = []
    for z in contexts(3, 2, seed=5):
        p = model.log_prob(x, context=z.expand(len(x), -1)).exp()
        assert abs(p.sum().item() - 1) < 1e-12
        probs.append(p)
    assert (probs[0] - probs[1]).abs().max() > 1e-2


# --- the sampling paths given z ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", PIXEL_MODELS)
def test_cached_conditional_sampling_equals_full_passes(float64, cls):
    spec = image_spec(4, 5)
    model = pixel_decoder(cls, spec, context_dim=3, spread=2.0)
    h = contexts(6, 3)

    def draw(cached):
        return model.sample(6, cached=cached, generator=torch.Generator().manual_seed(9), context=h)

    cached = draw(True)
    assert torch.equal(cached, draw(False))
    assert not torch.equal(cached, model.sample(6, generator=torch.Generator().manual_seed(9), context=h.flip(0)))


def test_rnn_steps_give_the_teacher_forced_logits(float64):
    spec = tokens_spec(4, 6)
    model = rnn_decoder(spec, context_dim=3, layers=2, spread=1.5)
    x, h = random_rows(5, 6, 4), contexts(5, 3)
    forced = model.logits(model.sequence.features(x), h)
    state, stepped = None, []
    for t in range(6):
        logits, state = model.step(x, t, state, h)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), forced, rtol=0, atol=1e-12)


# --- the observed site ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_rows", [2048, 5])
def test_observed_distribution_broadcasts_latents_against_data(float64, max_rows):
    model = ARVAE(image_spec(2, 3), PRESETS["small"])
    x, z = random_rows(4, 6, 2), contexts(3 * 4, 4).reshape(3, 4, 4)  # [B, D], [K, B, L]
    d = ConditionalAutoregressiveDistribution(model.decoder, z, max_rows=max_rows)
    assert d.batch_shape == (3, 4) and d.event_shape == (6,)
    loop = torch.stack([torch.stack([model.decoder.log_prob(x[b:b + 1], context=z[k, b:b + 1])[0]
                                     for b in range(4)]) for k in range(3)])
    torch.testing.assert_close(d.log_prob(x), loop, rtol=0, atol=1e-12)
    assert d.expand((2, 3, 4)).log_prob(x).shape == (2, 3, 4)
    assert d.sample((2,)).shape == (2, 3, 4, 6)


# --- bounds against log p(x) by quadrature ---------------------------------------------------------------


def _one_latent_model():
    """An AR-VAE with z of one dimension whose decoder leans on z, and a deliberately poor
    encoder (shifted, too narrow), so the bounds are visibly apart."""
    torch.manual_seed(3)
    config = ARVAEConfig(latent_dim=1, decoder="gated_pixelcnn", decoder_preset="small", encoder_hidden=(8,))
    model = ARVAE(image_spec(2, 3), config)
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.context_v.weight.mul_(4.0)
            block.context_h.weight.mul_(4.0)
        model.encoder[-1].bias.copy_(torch.tensor([0.7, -1.5]))
    return model


def log_px_by_quadrature(model, x, nodes=2001, bound=9.0):
    """``log int N(z; 0, 1) p(x | z) dz`` by the trapezoid rule on ``[-bound, bound]`` (the
    decoder's ReLUs make the integrand only piecewise smooth, which rules out Gauss-Hermite;
    the mass outside is below ``1e-18``)."""
    z = torch.linspace(-bound, bound, nodes)
    log_w = torch.full((nodes,), math.log(2 * bound / (nodes - 1)))
    log_w[[0, -1]] -= math.log(2)
    log_prior = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    with torch.no_grad():
        h = z.repeat_interleave(len(x))[:, None]
        lp = model.decoder.log_prob(x.repeat(nodes, 1), context=h).reshape(nodes, len(x))
    return torch.logsumexp(lp + (log_w + log_prior)[:, None], 0)


def test_elbo_iwae_and_is_against_log_px_by_quadrature(float64):
    """Bounds from the suite's log-weight core, on one draw of 8 particles per replicate, so
    ``IWAE_2k - IWAE_k`` is a paired difference (``IWAE_2k`` uses ``IWAE_k``'s particles and k more;
    its expectation is >= 0 all the same)."""
    model = _one_latent_model()
    x = all_images(model.data_spec)[torch.tensor([0, 7, 21, 42, 63])]  # 5 images of 2x3
    log_px = log_px_by_quadrature(model, x)
    assert (log_px - log_px_by_quadrature(model, x, nodes=1001)).abs().max() < 1e-4  # converged
    reps = 3000
    pyro.set_rng_seed(0)
    with torch.no_grad():
        lw = compute_log_weights(model.model, model.guide, (x.repeat(reps, 1),), {}, num_particles=8).log_w
    bounds = {k: (torch.logsumexp(lw[:k], 0) - math.log(k)).reshape(reps, len(x)) for k in (1, 2, 4, 8)}
    torch.testing.assert_close(bounds[1].reshape(-1), ELBO(1).per_datapoint(replace_w(lw[:1])), rtol=0, atol=0)
    torch.testing.assert_close(bounds[8].reshape(-1), IWAE(8).per_datapoint(replace_w(lw)), rtol=0, atol=1e-12)
    for k in (1, 2, 4):  # E[IWAE_k] < E[IWAE_2k], by many standard errors of the paired difference
        diff = bounds[2 * k] - bounds[k]
        assert (diff.mean(0) > 4 * diff.std(0) / math.sqrt(reps)).all(), k
    iwae8 = bounds[8]
    assert (iwae8.mean(0) < log_px + 4 * iwae8.std(0) / math.sqrt(reps)).all()  # below log p(x)
    assert (log_px - bounds[1].mean(0) > 0.3).all()  # the encoder is poor: a real gap to close
    # the estimators recover log p(x): from the prior, and from a proposal wider than the posterior
    # (the narrow, shifted encoder above has too light tails for IS: it underestimates by ~0.7 nats)
    pyro.set_rng_seed(1)
    naive = estimate_dataset(model, x, method="naive", num_samples=5000, progress=False)
    assert ((naive.log_px - log_px).abs() < 5 * naive.stderr + 1e-3).all()  # within 5 MC standard errors
    with torch.no_grad():
        model.encoder[-1].bias.copy_(torch.tensor([0.3, 1.5]))  # q = N(~0.3, ~1.7^2)
    est = estimate_dataset(model, x, method="is", num_samples=5000, progress=False)
    assert ((est.log_px - log_px).abs() < 5 * est.stderr + 1e-3).all()
    assert (est.stderr < 0.02).all()  # and that is tight


def replace_w(log_w):
    """Log-weights with only ``log_w`` filled in (what ELBO and IWAE reduce without KL terms)."""
    zeros = torch.zeros_like(log_w)
    return LogWeights(log_w, zeros, zeros, zeros, zeros, has_sf=False, scale=1.0)


# --- free bits -------------------------------------------------------------------------------------------------


def test_free_bits_floor_each_dimension_kl_at_lambda(float64):
    """With the closed-form KL, the free-bits loss minus the plain ELBO loss (same z) is
    ``B * sum_j (max(lambda, KLbar_j) - KLbar_j)``: each dimension's KL term is
    ``max(lambda, KLbar_j) >= lambda``. ``lambda`` is chosen between the dimensions' KLs so
    that some are floored and some are not."""
    torch.manual_seed(0)
    model = ARVAE(image_spec(2, 3), ARVAEConfig(latent_dim=4, decoder_preset="small", encoder_hidden=(8,)))
    with torch.no_grad():
        model.encoder[-1].bias.copy_(torch.tensor([1.5, 0.0, 0.3, 0.0, -2.0, 0.0, 0.0, 0.5]))
    x = random_rows(16, 6, 2)
    kl_bar = model.kl_per_dimension(x).mean(0)
    lam = float(kl_bar.sort().values[1:3].mean())  # two dimensions below, two above
    assert ((kl_bar < lam).sum(), (kl_bar > lam).sum()) == (2, 2)

    def loss(schedule):
        objective = make_objective(ObjectiveConfig(name="elbo", analytic_kl=True)).set_schedule(schedule)
        pyro.set_rng_seed(4)
        return objective.loss_terms(model.model, model.guide, x)[0]

    def loc_bias_grad(schedule):  # d loss / d (the encoder's bias of mu_j), j = 1..L
        model.zero_grad()
        loss(schedule).backward()
        return model.encoder[-1].bias.grad[:4].clone()

    fb = make_schedule(free_bits=lam, free_bits_per="dimension")
    plain, floored = loss(None), loss(fb)
    penalty = torch.clamp(kl_bar, min=lam)
    assert (penalty >= lam).all()
    torch.testing.assert_close(floored - plain, len(x) * (penalty - kl_bar).sum(), rtol=0, atol=1e-9)
    # a floored dimension's KL sends no gradient: the plain loss's KL gradient in mu_j's bias,
    # sum_b mu_bj (from KL = (mu^2 + sigma^2 - 1) / 2 - log sigma), is missing exactly there
    mu = model.encode(x)
    expected = torch.where(kl_bar < lam, -mu.sum(0), torch.zeros(4))
    torch.testing.assert_close(loc_bias_grad(fb) - loc_bias_grad(None), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(loss(make_schedule(free_bits=1e-12, free_bits_per="dimension")), plain, rtol=0,
                               atol=1e-9)  # lambda -> 0: the plain ELBO


# --- configs, presets, data --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        (ARVAEConfig(latent_dim=0), "latent_dim"),
        (ARVAEConfig(decoder="wavenet"), "unknown decoder"),
        (ARVAEConfig(decoder="pixelcnn", decoder_preset="huge"), "no preset"),
        (ARVAEConfig(decoder="charrnn", decoder_options={"width": 3}), "no option"),
    ],
)
def test_bad_configs_are_refused(config, match):
    spec = tokens_spec(4, 6) if config.decoder == "charrnn" else image_spec(4, 4)
    with pytest.raises(DGMError, match=match):
        ARVAE(spec, config)


def test_real_data_and_broken_strings_are_refused():
    with pytest.raises(DGMError, match="binary or categorical"):
        ARVAE(DataSpec((16,), "real", image_shape=(4, 4)), PRESETS["small"])
    model = ARVAE(tokens_spec(4, 6), PRESETS["small"])
    assert isinstance(model.decoder, CharRNN)
    with pytest.raises(DGMError, match="END-padded"):
        model.check_data(torch.tensor([[1.0, 0, 2, 0, 0, 0]]))


def test_presets_build_and_are_registered():
    assert MODELS["ar_vae"] is ARVAE and {"mnist", "names", "small"} <= set(PRESETS)
    mnist = ARVAE(image_spec(28, 28), PRESETS["mnist"])
    assert isinstance(mnist.decoder, GatedPixelCNN) and mnist.decoder.context_dim == 32
    names = ARVAE(tokens_spec(27, 12), PRESETS["names"])
    assert isinstance(names.decoder, CharRNN) and names.decoder.config.layers == 1
    assert isinstance(ARVAE(image_spec(4, 4), PRESETS["small"]).decoder, GatedPixelCNN)
    x = torch.zeros(2, 12)
    x[:, 0] = 3
    assert names.sample(3, temperature=0.7).shape == (3, 12)
    names.check_data(x)


# --- the experiment -----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(
    "run_name",
    [n for n, _ in EXPERIMENTS["ar-vae"].runs],
)
def test_ar_vae_experiment_runs_end_to_end(run_name, tmp_path, one_thread):
    config = dict(EXPERIMENTS["ar-vae"].runs)[run_name]
    config = replace(
        config, train=replace(config.train, device="cpu", **TINY["train"]), eval=replace(config.eval, **TINY["eval"])
    )
    summary = train_run(config, tmp_path / run_name)
    assert summary["steps"] == TINY["train"]["max_steps"] and summary["test"]["n"] == TINY["eval"]["limit"]
    assert summary["test"]["estimator"] == "is" and "active_units" in summary["test"]
    if run_name.startswith("names"):  # the estimated NLL per symbol of the evaluated names
        test = datasets.load("names").test[: summary["test"]["n"]]
        symbols = float(num_symbols(test).sum())
        assert summary["test"]["nats_per_char"] == pytest.approx(summary["test"]["nll"] * len(test) / symbols)
    row = ar_vae_report([tmp_path / run_name]).splitlines()[-1].split("|")
    assert row[1].strip() == run_name and float(row[2]) >= 0

"""WaveNet: normalization, causality and receptive field through gradients, cached (queue)
generation against the naive one and against the density, mu-law companding, the speech
data and training through the runner."""

import itertools
import math
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from experiments import speech
from experiments.data import Dataset, load
from models import MODELS
from models.autoregressive.wavenet import WaveNet, WaveNetConfig, mu_law_decode, mu_law_encode
from models.base import DataError, DataSpec, DGMError
from models.nn.dilated import CausalConv1d
from tests.helpers import fit_exact

pytestmark = pytest.mark.usefixtures("one_thread")

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt install espeak-ng)")


def config(layers=2, stacks=1, kernel_size=2, width=6):
    return WaveNetConfig(
        residual_channels=width,
        dilation_channels=width,
        skip_channels=width,
        head_channels=width,
        kernel_size=kernel_size,
        layers=layers,
        stacks=stacks,
    )


def spec_for(levels, length):
    """Binary sequences if ``levels`` is None, else categorical ones with ``levels`` levels."""
    if levels is None:
        return DataSpec((length,), "binary")
    return DataSpec((length,), "categorical", num_levels=levels)


def build(spec, cfg, std=0.5, seed=0):
    """A model with larger random weights than its init, so its distribution is far from uniform."""
    model = WaveNet(spec, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def all_sequences(length, levels):
    return torch.tensor(list(itertools.product(range(levels), repeat=length)), dtype=torch.get_default_dtype())


def random_data(spec, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = spec.num_levels or 2
    return torch.randint(0, k, (n, spec.dim), generator=g).to(torch.get_default_dtype())


# --- normalization by enumeration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "levels, length, cfg",
    [
        (3, 4, config(layers=2, stacks=1)),  # R = 4: every position sees the whole prefix
        (3, 4, config(layers=1, stacks=2, kernel_size=3)),  # R = 5
        (None, 8, config(layers=2, stacks=1)),  # R = 4 < 8: positions 4.. forget x_0..
        (None, 8, config(layers=2, stacks=2, kernel_size=3)),  # R = 13
    ],
)
def test_probabilities_sum_to_one(float64, levels, length, cfg):
    model = build(spec_for(levels, length), cfg)
    p = model.log_prob(all_sequences(length, levels or 2)).exp()
    assert len(p) == (levels or 2) ** length
    assert abs(p.sum().item() - 1) < 1e-10
    assert p.max() < 0.99 and p.max() / p.min() > 10  # neither a point mass nor uniform


# --- the causal dilated convolution -------------------------------------------------------------------


def delayed(h, s):
    """``h`` delayed by ``s`` steps along time, zeros first: ``out_t = h_{t - s}``."""
    return F.pad(h, (s, 0))[..., : h.shape[-1]]


@pytest.mark.parametrize("kernel_size, dilation", [(2, 1), (2, 3), (3, 2), (4, 1)])
def test_causal_conv_is_its_formula_in_both_forms(float64, kernel_size, dilation):
    """``y_t = b + sum_j W_j h_{t - (k-1-j) d}``, from ``forward`` and from queued steps
    (the queue wraps around: T = 13 > (k - 1) d)."""
    conv = CausalConv1d(3, 4, kernel_size, dilation)
    h = torch.randn(2, 3, 13, generator=torch.Generator().manual_seed(0))
    taps = [
        torch.einsum("oc,bct->bot", conv.weight[:, :, j], delayed(h, (kernel_size - 1 - j) * dilation))
        for j in range(kernel_size)
    ]
    expected = conv.bias[None, :, None] + sum(taps)
    torch.testing.assert_close(conv(h), expected, rtol=0, atol=1e-12)
    queue = conv.new_queue(2, h.dtype, h.device)
    steps = torch.stack([conv.step(h[:, :, t], queue) for t in range(13)], -1)
    torch.testing.assert_close(steps, expected, rtol=0, atol=1e-12)
    assert conv.receptive_field == (kernel_size - 1) * dilation + 1


# --- causality and the receptive field, through gradients -------------------------------------------


def dependency_matrix(fn, features):
    """``dep[t, j]``: output ``t`` of ``fn(features)`` (``[B, T, ...]``) has a non-zero
    gradient in the features of position ``j`` somewhere in the batch."""
    f = features.clone().requires_grad_(True)
    out = fn(f)
    rows = []
    for t in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, t].sum(), f, retain_graph=True)
        rows.append(grad.abs().sum((0, 2)) > 0)
    return torch.stack(rows)


def dependencies(model, x):
    """``(dep of the logits, dep of log p(x_t | x_<t))`` on the input features."""
    flat = x.reshape(len(x), -1)
    features = model.sequence.features(flat)
    dep = dependency_matrix(model.logits, features)
    dep_lp = dependency_matrix(lambda f: model.sequence.log_prob(model.logits(f), flat), features)
    return dep, dep_lp


def window(length, r):
    """``w[t, j] = t - r <= j < t``: the positions the conditional of ``x_t`` should read."""
    t = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j < t) & (j >= t - r)


@pytest.mark.parametrize(
    "layers, stacks, kernel_size, length, levels",
    [
        (1, 1, 2, 6, None),  # R = 2
        (2, 1, 2, 9, 3),  # R = 4
        (3, 1, 2, 12, None),  # R = 8
        (2, 2, 2, 12, 4),  # R = 7
        (2, 1, 3, 12, None),  # R = 7
        (3, 1, 2, 6, 5),  # R = 8 > T: every earlier position
    ],
)
def test_conditionals_read_exactly_the_receptive_field(float64, layers, stacks, kernel_size, length, levels):
    spec = spec_for(levels, length)
    model = WaveNet(spec, config(layers, stacks, kernel_size)).eval()
    r = 1 + stacks * (kernel_size - 1) * (2**layers - 1)
    assert model.receptive_field == r
    dep, dep_lp = dependencies(model, random_data(spec))
    expected = window(length, r)
    leaks = ((dep | dep_lp) & ~expected).nonzero().tolist()
    missing = (expected & ~(dep & dep_lp)).nonzero().tolist()
    assert leaks == [], f"x_t's conditional reads x_j outside [t - R, t) for (t, j) in {leaks}"
    assert missing == [], f"x_t's conditional ignores x_j inside [t - R, t) for (t, j) in {missing}"


def unshifted(model):
    """A leaking variant: the first layer is not shifted, so position t reads x_t itself."""
    model.embed.forward = lambda features: model.embed.proj(features)
    return model


def padded_right(model):
    """A leaking variant: the dilated convs pad on the right (output t reads h_t and h_{t+d})."""
    for block in model.blocks:
        conv = block.conv
        conv.forward = lambda h, conv=conv: F.conv1d(
            F.pad(h, (0, conv.receptive_field - 1)), conv.weight, conv.bias, dilation=conv.dilation
        )
    return model


@pytest.mark.parametrize("leak", [unshifted, padded_right])
def test_a_leaking_variant_is_detected(float64, leak):
    spec = spec_for(None, 8)
    model = build(spec, config(layers=2), std=0.3)
    dep, _ = dependencies(model, random_data(spec))
    assert (dep & ~window(8, model.receptive_field)).sum() == 0
    dep, _ = dependencies(leak(model), random_data(spec))
    leaks = (dep & ~torch.ones(8, 8).tril(-1).bool()).nonzero().tolist()
    if leak is unshifted:  # the receptive field moves forward by one: x_t reads x_{t-3}..x_t
        assert leaks == [[t, t] for t in range(8)]
    else:  # x_t reads x_{t-1}..x_{t+2} (the shift, then d = 1 and d = 2 padded on the right); the shift drops x_7
        assert leaks == [[t, j] for t in range(8) for j in range(t, min(t + 3, 7))]
    assert abs(model.log_prob(all_sequences(8, 2)).exp().sum().item() - 1) > 1e-3  # and is not normalized


# --- cached generation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "levels, cfg",
    [(None, config(layers=3)), (5, config(layers=2, stacks=2, kernel_size=3)), (4, config(layers=4, stacks=1))],
)
def test_cached_steps_equal_the_full_pass(float64, levels, cfg):
    """Teacher-forced through the queues: every step's logits equal the one-pass logits,
    also after the queues wrap around (T = 40 > R)."""
    spec = spec_for(levels, 40)
    model = build(spec, cfg)
    x = random_data(spec, n=5)
    full = model.logits(model.sequence.features(x))
    for cached in (True, False):
        stepper = model.stepper(5, cached=cached)
        steps = torch.stack([stepper.step(x, t) for t in range(40)], 1)
        torch.testing.assert_close(steps, full, rtol=0, atol=1e-12)


def prefix_given(n, length, seed=2, levels=2):
    """Row-dependent known prefixes (lengths 0..n-1 spread over the sequence), NaN after."""
    g = torch.Generator().manual_seed(seed)
    given = torch.randint(0, levels, (n, length), generator=g).to(torch.get_default_dtype())
    for i in range(n):
        given[i, (i * length) // n :] = float("nan")
    return given


@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("with_given", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_and_naive_sampling_are_identical(float64, levels, with_given, temperature):
    spec = spec_for(levels, 37)
    model = build(spec, config(layers=3, stacks=2), std=0.3)
    n = 6
    given = prefix_given(n, 37, levels=levels or 2) if with_given else None

    def draw(cached, seed=0):
        g = torch.Generator().manual_seed(seed)
        return model.sample(n, given=given, cached=cached, generator=g, temperature=temperature)

    fast, naive = draw(True), draw(False)
    assert torch.equal(fast, naive)
    assert not torch.equal(fast, draw(True, seed=1))  # the generator matters
    assert len(fast.unique()) == (levels or 2)
    if given is not None:
        known = ~torch.isnan(given)
        assert torch.equal(fast[known], given[known])


def test_samples_follow_the_density(float64):
    """Cached ancestral samples (and conditional ones) have the frequencies exp(log_prob)
    within 5 standard errors per configuration."""
    levels, length, n = 3, 3, 30_000
    model = build(spec_for(levels, length), config(layers=1, stacks=1), std=1.0)
    x = all_sequences(length, levels)
    p = model.log_prob(x).exp()
    codes = torch.tensor([levels**2, levels, 1], dtype=torch.get_default_dtype())

    def frequencies(samples):
        return torch.bincount((samples @ codes).long(), minlength=len(x)).double() / len(samples)

    g = torch.Generator().manual_seed(0)
    freq = frequencies(model.sample(n, generator=g))
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()
    given = torch.full((n, length), float("nan"))
    given[:, 0] = 2.0
    freq = frequencies(model.sample(n, given=given, generator=g))
    cond = torch.where(x[:, 0] == 2, p, torch.zeros_like(p))
    cond = cond / cond.sum()  # p(x_1, x_2 | x_0 = 2)
    assert ((freq - cond).abs() <= 5 * (cond * (1 - cond) / n).sqrt() + 1e-3).all()


# --- configuration and data errors -------------------------------------------------------------------


def test_bad_configurations_and_data_are_refused():
    spec = spec_for(None, 8)
    with pytest.raises(DGMError, match="kernel_size must be >= 2"):
        WaveNet(spec, config(kernel_size=1))
    with pytest.raises(DGMError, match="must be >= 1"):
        WaveNet(spec, config(layers=0))
    with pytest.raises(DGMError, match="RNADE"):
        WaveNet(DataSpec((8,), "real"), config())
    model = WaveNet(spec, config())
    with pytest.raises(DGMError, match="temperature"):
        model.sample(2, temperature=-1)
    with pytest.raises(DGMError, match="given must have shape"):
        model.sample(2, given=torch.zeros(3, 8))
    with pytest.raises(DataError, match="values in"):
        model.check_data(torch.full((2, 8), 0.5))


def test_registry_and_presets():
    assert MODELS["wavenet"] is WaveNet
    assert {"small", "mnist", "speech"} <= set(WaveNet.presets)
    mnist = WaveNet(DataSpec((784,), "binary", image_shape=(28, 28)), WaveNet.presets["mnist"])
    assert mnist.receptive_field >= 784  # the whole image before each pixel
    audio = WaveNet(DataSpec((4000,), "categorical", num_levels=256), WaveNet.presets["speech"])
    assert audio.receptive_field == 1023  # 128 ms at 8 kHz


# --- mu-law --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 16, 256])
def test_mu_law_round_trip(float64, levels):
    mu = levels - 1
    q = torch.arange(levels, dtype=torch.float64)
    assert torch.equal(mu_law_encode(mu_law_decode(q, levels), levels), q)  # levels are fixed points
    assert mu_law_decode(q, levels)[[0, -1]].tolist() == [-1.0, 1.0]
    x = torch.linspace(-1, 1, 20_001, dtype=torch.float64)
    q = mu_law_encode(x, levels)
    assert q.min() == 0 and q.max() == mu and torch.equal(q, q.round())
    x_hat = mu_law_decode(q, levels)

    def compand(v):
        return torch.sign(v) * torch.log1p(mu * v.abs()) / math.log1p(mu)

    # quantization error: half a grid step 2 / mu in the companded domain ...
    assert ((compand(x_hat) - compand(x)).abs() <= 1 / mu + 1e-12).all()
    # ... which is a small step in x near 0 and a large one near +-1 (F^-1' grows as (1 + mu)^|y|)
    slope = math.log1p(mu) / mu * (1 + mu) ** (compand(x).abs() + 1 / mu).clamp(max=1)
    assert ((x_hat - x).abs() <= slope / mu + 1e-12).all()
    if levels == 256:
        assert (x_hat - x)[x.abs() < 1e-3].abs().max() < 1e-4 and (x_hat - x)[x.abs() > 0.9].abs().max() > 1e-2


def test_mu_law_refuses_unnormalized_audio():
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        mu_law_encode(torch.tensor([0.5, 1.5]))


# --- speech data ---------------------------------------------------------------------------------------


def test_resampling_keeps_the_band_and_removes_what_would_alias():
    """22,050 -> 8,000 Hz: a 1 kHz tone keeps its amplitude, a 5 kHz tone (above the new
    Nyquist frequency, 4 kHz, where it would alias to 3 kHz) is removed."""
    t = np.arange(22_050) / 22_050
    for freq, gain in ((1_000, 1.0), (5_000, 0.0)):
        y = speech.resample(np.sin(2 * np.pi * freq * t), 22_050, 8_000)
        assert len(y) == 8_000
        middle = y[1_000:-1_000]  # away from the filter's edge effects
        assert abs(np.sqrt(2) * middle.std() - gain) < 1e-2


def test_speech_without_espeak_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt install espeak-ng"):
        speech.load_speech(cache_dir=tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match="apt install espeak-ng"):
        load("speech")


@needs_espeak
def test_speech_dataset(monkeypatch, tmp_path):
    words, voices = ("yes", "no", "stop"), ("en-us", "en-gb")
    kwargs = dict(words=words, voices=voices, speeds=(160,), pitches=(50,), length=1_000, cache_dir=tmp_path)
    data = speech.load_speech(**kwargs)
    assert data.spec == DataSpec((1_000,), "categorical", num_levels=256)
    pairs = {f"{w}/{v}" for w in words for v in voices}
    groups = {part: set(data.info["groups"][part]) for part in ("train", "val", "test")}
    assert groups["train"] | groups["val"] | groups["test"] == pairs and sum(map(len, groups.values())) == 6
    assert len(groups["val"]) == len(groups["test"]) == 1  # one (word, voice) pair each, none shared
    for part in ("train", "val", "test"):
        x, labels = getattr(data, part), getattr(data, f"{part}_labels")
        assert x.dtype == torch.float32 and x.shape[1:] == (1_000,) and len(x) == len(labels) >= 1
        assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 255
        assert {words[i] for i in labels.tolist()} == {g.split("/")[0] for g in groups[part]}
        assert x.std(1).min() > 1  # clips hold sound, not only padding
    audio = mu_law_decode(data.train.double())
    assert abs(audio.abs().max().item() - speech.PEAK) < 0.02  # peak-normalized (mu-law step at 0.9: ~0.01)
    # cached: a second load reads the file and synthesizes nothing
    (cache,) = tmp_path.glob("speech-*.npz")
    monkeypatch.setattr(speech, "synthesize", lambda *a: pytest.fail("synthesized again"))
    again = speech.load_speech(**kwargs)
    assert torch.equal(again.train, data.train) and torch.equal(again.test_labels, data.test_labels)
    assert again.info["cache"] == str(cache)
    out = speech.write_wav(tmp_path / "clip.wav", data.test[0])
    assert out.stat().st_size == 44 + 2 * 1_000  # a 16-bit mono PCM WAV header and the samples


# --- training through the runner ---------------------------------------------------------------------------


def test_training_learns_a_dilated_dependency(one_thread):
    """Bits with x_t = x_{t-2} xor Bernoulli(0.05): the true NLL is 2 log 2 + (T - 2) H(0.05)
    nats; a fitted WaveNet gets close to it, far below the 16 log 2 of independent fair bits."""
    length, flip = 16, 0.05
    g = torch.Generator().manual_seed(0)

    def sample(n):
        x = torch.zeros(n, length)
        x[:, :2] = torch.bernoulli(torch.full((n, 2), 0.5), generator=g)
        for t in range(2, length):
            x[:, t] = (x[:, t - 2] + torch.bernoulli(torch.full((n,), flip), generator=g)) % 2
        return x

    data = Dataset("xor2", spec_for(None, length), sample(2_000), sample(200), sample(1_000))
    model = WaveNet(data.spec, config(layers=2, width=8))
    nll = fit_exact(model, data, epochs=15, lr=1e-2)
    entropy = -(flip * math.log(flip) + (1 - flip) * math.log(1 - flip))
    truth = 2 * math.log(2) + (length - 2) * entropy
    assert truth - 0.2 < nll < truth + 0.4, (nll, truth)

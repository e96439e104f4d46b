"""Diagnostics (``inference.diagnostics``): active units, a unit being active when the
variance over x of its posterior mean exceeds 0.01 (Burda et al. 2016), counted per layer."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from inference.diagnostics import active_units
from models.base import DataSpec, GenerativeModel
from models.latent.vae import VAE, VAEConfig
from models.latent.vae2 import VAE2, VAE2Config


def _set_final(layer_net, loc_rows: torch.Tensor, loc_bias: float = 0.0, raw_scale: float = 0.0):
    """Set the output layer of a ConditionalGaussian: loc weights ``loc_rows`` [L, in]."""
    last = layer_net.net[-1]
    n = loc_rows.shape[0]
    with torch.no_grad():
        last.weight.zero_()
        last.weight[:n] = loc_rows
        last.bias.zero_()
        last.bias[:n] = loc_bias
        last.bias[n:] = raw_scale


def test_active_units_are_counted_per_layer(float64):
    """h1: three units whose means vary with x (active), the rest constant; h2: its mean
    ignores h1 (none active). The single-site VAE still gets an int."""
    torch.manual_seed(0)
    model = VAE2(DataSpec((8,), "binary"), VAE2Config(h1_dim=5, h2_dim=4, hidden1=(16,), hidden2=(8,))).double()
    rows = torch.zeros(5, 16, dtype=torch.float64)
    rows[:3] = 3.0 * torch.randn(3, 16, dtype=torch.float64)
    _set_final(model.q_h1, rows)
    _set_final(model.q_h2, torch.zeros(4, 8, dtype=torch.float64), loc_bias=1.5)
    x = torch.bernoulli(torch.full((400, 8), 0.5, dtype=torch.float64))
    assert active_units(model, model.guide, x) == {"h1": 3, "h2": 0, "total": 3}
    vae = VAE(DataSpec((8,), "binary"), VAEConfig(latent_dim=4, encoder_hidden=(16,), decoder_hidden=(16,))).double()
    assert isinstance(active_units(vae, vae.guide, x), int)


def test_upper_layer_means_average_over_the_lower_layers_noise(float64):
    """E_q[h2 | x] = E_q(h1|x)[loc2(h1)]: with q(h1|x) the same for every x, h2 is inactive
    although a single draw of h1 would make loc2(h1) vary across x (Var = 0.09 > 0.01)."""
    torch.manual_seed(0)
    cfg = VAE2Config(h1_dim=1, h2_dim=1, hidden1=(4,), hidden2=(4,), activation="relu")
    model = VAE2(DataSpec((6,), "binary"), cfg).double()
    _set_final(model.q_h1, torch.zeros(1, 4, dtype=torch.float64), raw_scale=math.log(math.e**0.3 - 1))  # sd 0.3
    # q(h2 | h1): loc = relu(h1) - relu(-h1) = h1 through two hidden units
    hidden = model.q_h2.net[0]
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.bias.zero_()
        hidden.weight[0, 0], hidden.weight[1, 0] = 1.0, -1.0
    rows = torch.zeros(1, 4, dtype=torch.float64)
    rows[0, 0], rows[0, 1] = 1.0, -1.0
    _set_final(model.q_h2, rows)
    x = torch.bernoulli(torch.full((2000, 6), 0.5, dtype=torch.float64))
    from inference.diagnostics import posterior_means

    one_draw = posterior_means(model.guide, x, num_draws=1)["h2"].var(0)
    averaged = posterior_means(model.guide, x, num_draws=16)["h2"].var(0)
    assert 0.07 < float(one_draw) < 0.11  # Var(h1) = 0.09: a single draw looks active
    assert float(averaged) < 0.01  # 0.09 / 16
    assert active_units(model, model.guide, x) == {"h1": 0, "h2": 0, "total": 0}


class _HandPosterior(GenerativeModel):
    """z ~ N(0, I), x | z ~ N(z, I), with a hand-written guide whose posterior mean is
    ``x`` itself (``echo``) or the same 0.5 for every x."""

    def __init__(self, d: int, echo: bool):
        super().__init__(DataSpec((d,), "real"))
        self.echo = echo

    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(self, x, idx=None, size=None):
        loc = x if self.echo else torch.full_like(x, 0.5)
        with self.data_plate(x, idx, size):
            pyro.sample("z", dist.Normal(loc, 0.3).to_event(1))


def test_active_units_are_the_units_whose_posterior_mean_varies_more_than_the_threshold(float64):
    """A mean that ignores x: no unit is active. A mean equal to x: unit j is active exactly
    when Var(x[:, j]) > 0.01; columns of variance 0, 1e-4 and 0.0025 stay inactive (over
    two evaluation chunks of 500 rows)."""
    sd = torch.tensor([0.0, 0.01, 0.05, 0.3, 1.0, 2.0], dtype=torch.float64)
    x = torch.randn(1000, 6, dtype=torch.float64) * sd + 3.0
    assert int((x.var(0) > 1e-2).sum()) == 3  # the data: three columns above the threshold
    echo, constant = _HandPosterior(6, echo=True), _HandPosterior(6, echo=False)
    assert active_units(constant, constant.guide, x) == 0
    assert active_units(echo, echo.guide, x) == 3
    assert active_units(echo, echo.guide, x, threshold=0.5) == 2  # Var 1 and 4 > 0.5 > 0.09

"""VAE with an autoregressive decoder: a latent code on top of a PixelCNN or an LSTM.

Generative program::

    z ~ N(0, I_L)
    x | z ~ p(x | z) = prod_i p(x_i | x_<i, z)      # an exact, conditional autoregressive model

with the decoder one of

* images (binarized MNIST): a **conditional (Gated) PixelCNN** whose every layer adds a
  ``z``-dependent bias to its pre-activations, ``tanh(W_f * x + V_f z) * sigmoid(W_g * x + V_g z)``
  (van den Oord et al., "Conditional Image Generation with PixelCNN Decoders", NeurIPS 2016,
  eq. 4; the PixelVAE of Gulrajani et al. 2017 is the same idea), Bernoulli pixels;
* END-padded strings (``names``): an **LSTM** whose initial state is ``tanh(W z + b)`` and
  whose input at every step is ``[e(x_{t-1}); z]`` (Bowman et al., "Generating Sentences from a
  Continuous Space", CoNLL 2016).

Guide (amortized): ``q(z | x) = N(mu(x), diag(sigma(x)^2))`` from an MLP on the pixels, or on
the one-hot characters. The observed site's distribution is the decoder's exact
``log p(x | z)`` (:class:`ConditionalAutoregressiveDistribution`), so every objective and
estimator of the suite applies unchanged: ELBO, IWAE, importance-sampled ``log p(x)``.

**Posterior collapse.** A decoder that can model ``x`` well on its own can reach the ELBO's
optimum with ``q(z | x) = p(z)``: the KL term is then 0 and ``z`` carries nothing (Bowman et
al. 2016; Chen et al., "Variational Lossy Autoencoder", ICLR 2017). The ELBO's gradient pushes
there early in training, when ``z`` is still noise to the decoder. The two classic fixes are
runner schedules (``inference/schedules.py``), not model code: KL annealing (``--kl-warmup``)
and free bits (``--free-bits LAMBDA --free-bits-per dimension``, Kingma et al. 2016), which
stops penalizing each latent dimension's KL below ``LAMBDA`` nats. ``dgm reproduce ar-vae``
compares the three on MNIST and on names (test KL, active units, ELBO and IS NLL).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence

from models.autoregressive.base import AutoregressiveDistribution
from models.autoregressive.charrnn import CharRNN
from models.autoregressive.gated_pixelcnn import GatedPixelCNN
from models.autoregressive.pixelcnn import PixelCNN
from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.gaussian import diagonal_normal, standard_normal
from models.nn import MLP
from models.nn.units import units_for
from models.registry import register_model

__all__ = ["ARVAE", "ARVAEConfig", "ConditionalAutoregressiveDistribution", "PRESETS", "DECODERS"]

DECODERS = {"pixelcnn": PixelCNN, "gated_pixelcnn": GatedPixelCNN, "charrnn": CharRNN}
"""Autoregressive models that accept a context (``context_dim``), by name."""


@dataclass
class ARVAEConfig:
    """``decoder``: ``auto`` (Gated PixelCNN for images, char-RNN for token strings) or a
    name of :data:`DECODERS`; ``decoder_preset``: a preset of that class, with
    ``decoder_options`` overriding its fields; the encoder is an MLP with ``encoder_hidden``."""

    latent_dim: int = 32
    decoder: str = "auto"
    decoder_preset: str = "small"
    decoder_options: Dict[str, Any] = field(default_factory=dict)
    encoder_hidden: Tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    min_posterior_scale: float = 1e-4


PRESETS = {
    # the `cpu` Gated PixelCNN (16 channels, a 7x7 first layer and 3 gated layers: each pixel sees
    # the 7 rows above it, 6 columns either side) under the IWAE paper's encoder (784-200-200, tanh);
    # ~0.4 s a step of 100 digits on one CPU thread
    "mnist": ARVAEConfig(latent_dim=32, decoder="gated_pixelcnn", decoder_preset="cpu"),
    # the `names` char-RNN, one layer (Bowman et al. use one LSTM layer), z joining every step
    "names": ARVAEConfig(
        latent_dim=16,
        decoder="charrnn",
        decoder_preset="names",
        decoder_options={"layers": 1},
        encoder_hidden=(256,),
    ),
    "small": ARVAEConfig(latent_dim=4, decoder="auto", decoder_preset="small", encoder_hidden=(32,)),
}


def is_token_string(spec: DataSpec) -> bool:
    """Categorical data of one axis without an image shape: END-padded strings (names)."""
    return spec.support == "categorical" and len(spec.event_shape) == 1 and spec.image_shape is None


class ConditionalAutoregressiveDistribution(AutoregressiveDistribution):
    """``p(x | h)`` of a conditional autoregressive model for a batch of contexts
    ``h [*batch, L]``: the batch shape is ``h``'s (particles and datapoints under the
    objectives' plates), ``log_prob`` broadcasts ``value [*, *event]`` against it and runs
    the decoder on ``max_rows`` (datapoint, context) pairs at a time."""

    def __init__(self, model, context: Tensor, max_rows: int = 2048):
        self.context = context
        self.max_rows = max_rows
        super().__init__(model, context.shape[:-1])

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.context.shape[-1:]
        return ConditionalAutoregressiveDistribution(self.ar_model, self.context.expand(shape), self.max_rows)

    def log_prob(self, value: Tensor) -> Tensor:
        event = self.event_shape
        batch = torch.broadcast_shapes(value.shape[: value.dim() - len(event)], self.batch_shape)
        x = value.expand(batch + event).reshape((-1,) + event)
        h = self.context.expand(batch + self.context.shape[-1:]).reshape(x.shape[0], -1)
        parts = [
            self.ar_model.log_prob(x[i : i + self.max_rows], context=h[i : i + self.max_rows])
            for i in range(0, x.shape[0], self.max_rows)
        ]
        return torch.cat(parts).reshape(batch)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        h = self.context.expand(shape + self.context.shape[-1:]).reshape(-1, self.context.shape[-1])
        return self.ar_model.sample(h.shape[0], context=h).reshape(shape + self.event_shape)


def build_decoder(data_spec: DataSpec, config: ARVAEConfig) -> nn.Module:
    """The conditional autoregressive decoder the config names, with ``context_dim = L``."""
    kind = config.decoder
    if kind == "auto":
        kind = "charrnn" if is_token_string(data_spec) else "gated_pixelcnn"
    if kind not in DECODERS:
        raise DGMError(f"unknown decoder {kind!r}; choose from auto, {', '.join(DECODERS)}")
    cls = DECODERS[kind]
    if config.decoder_preset not in cls.presets:
        raise DGMError(f"{kind} has no preset {config.decoder_preset!r}; choose from {sorted(cls.presets)}")
    valid = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(config.decoder_options) - valid)
    if unknown:
        raise DGMError(f"{kind} has no option(s) {unknown} in decoder_options; options: {', '.join(sorted(valid))}")
    decoder_config = replace(cls.presets[config.decoder_preset], **config.decoder_options)
    return cls(data_spec, decoder_config, context_dim=config.latent_dim)


@register_model
class ARVAE(GenerativeModel):
    """VAE whose decoder is a conditional PixelCNN / Gated PixelCNN / LSTM (see the module docstring)."""

    name = "ar_vae"
    config_class = ARVAEConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[ARVAEConfig] = None):
        super().__init__(data_spec)
        config = config or ARVAEConfig()
        self.config = config
        if config.latent_dim < 1:
            raise DGMError(f"latent_dim must be >= 1, got {config.latent_dim}")
        if config.min_posterior_scale <= 0:
            raise DGMError(f"min_posterior_scale must be > 0, got {config.min_posterior_scale}")
        self.units = units_for(data_spec, "The autoregressive VAE")
        self.decoder = build_decoder(data_spec, config)
        self.encoder = MLP(
            data_spec.dim * self.units.levels, config.encoder_hidden, 2 * config.latent_dim, config.activation
        )

    def check_data(self, x: Tensor, what: str = "data") -> None:
        self.decoder.check_data(x, what)  # the data spec, and the END convention of strings

    # --- Pyro program -----------------------------------------------------------------
    def prior(self, like: Tensor) -> dist.TorchDistribution:
        return standard_normal(like, self.config.latent_dim)

    def likelihood(self, z: Tensor) -> ConditionalAutoregressiveDistribution:
        """``p(x | z)``, batch shape ``z.shape[:-1]``."""
        return ConditionalAutoregressiveDistribution(self.decoder, z)

    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(z), obs=x)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        """The encoder's ``q(z | x)``, a diagonal Gaussian with batch shape ``[B]``."""
        flat = self.units.features(x.reshape(x.shape[0], -1)).reshape(x.shape[0], -1)
        return diagonal_normal(self.encoder(flat), self.config.min_posterior_scale)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        q = self.posterior(x)
        with self.data_plate(x, idx, size):
            pyro.sample("z", q)

    # --- everything else ---------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, **decoder_kwargs) -> Tensor:
        """``n`` ancestral samples: ``z ~ N(0, I)``, then the decoder's ancestral sampler given
        ``z`` (``decoder_kwargs``: e.g. ``temperature`` for strings)."""
        ref = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, dtype=ref.dtype, device=ref.device)
        return self.decoder.sample(n, generator=generator, context=z, **decoder_kwargs)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Posterior means ``E_q[z | x]``."""
        return self.posterior(x).mean

    @torch.no_grad()
    def kl_per_dimension(self, x: Tensor) -> Tensor:
        """``[B, L]``: ``KL(q(z_j | x) || N(0, 1))`` in closed form, per datapoint and latent
        dimension; their sum is the ELBO's KL term and near-zero columns are collapsed units."""
        q = self.posterior(x).base_dist
        return kl_divergence(q, dist.Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale)))

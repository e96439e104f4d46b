"""Class-conditional variational autoencoder (Kingma et al. 2014, section 3.1.2 with y
observed; Sohn et al. 2015).

Generative program, given the class label y (one-hot ``e_y``)::

    z ~ N(0, I_L)
    x | y, z ~ likelihood(decoder([z, e_y]))

Default guide::

    q(z | x, y) = N(mu, diag(sigma^2)),  (mu, log sigma) = encoder([x, e_y])

so the ELBO bounds the class-conditional log-likelihood::

    log p(x | y) >= E_q(z|x,y)[log p(x | y, z)] - KL(q(z | x, y) || p(z)).

Because the label is given, z only has to carry what y does not: the writing style. Fixing
z and varying y gives analogies (the same style in every class; Kingma et al. 2014,
figure 1), drawn by ``experiments.conditional_plots``.

Labels enter through the contract's keyword ``y`` (``uses_labels``): int64 classes
``0..num_classes-1``. ``sample(n, y)`` draws x given classes y (by default the classes
in turn). The network pieces (``posterior``, ``decode``) accept labels with any batch
shape that broadcasts against the data, which the M2 semi-supervised model
(``models.latent.m2``) builds on when it enumerates y.

References: D. P. Kingma, D. J. Rezende, S. Mohamed and M. Welling, "Semi-supervised
learning with deep generative models", NeurIPS 2014; K. Sohn, H. Lee and X. Yan,
"Learning structured output representation using deep conditional generative models",
NeurIPS 2015.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from models.base import DataError, DataSpec, DGMError, GenerativeModel
from models.latent.gaussian import diagonal_normal, standard_normal
from models.nn import MLP, likelihood_for
from models.registry import register_model


@dataclass
class CVAEConfig:
    latent_dim: int = 50
    num_classes: int = 10
    encoder_hidden: Tuple[int, ...] = (500,)
    decoder_hidden: Tuple[int, ...] = (500,)
    activation: str = "softplus"
    gaussian_scale: Optional[float] = None  # initial (or fixed) decoder scale for real data
    learn_scale: bool = True  # learn the decoder scale for real data (False: fixed at gaussian_scale)
    decoder_scale: str = "shared"  # real data: shared | per-pixel | per-datapoint (decoder outputs)
    min_posterior_scale: float = 1e-4


PRESETS = {
    # Kingma et al. 2014's MNIST networks: one hidden layer of 500 softplus units, 50 latents
    "mnist": CVAEConfig(),
    "small": CVAEConfig(latent_dim=8, encoder_hidden=(64,), decoder_hidden=(64,), activation="tanh"),
}


def concat(a: Tensor, b: Tensor) -> Tensor:
    """Concatenate along the last dimension, broadcasting the batch dimensions (a label
    enumerated as ``[K, 1]`` against a batch ``[B]`` gives ``[K, B, ...]``)."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(batch + a.shape[-1:]), b.expand(batch + b.shape[-1:])], dim=-1)


@register_model
class CVAE(GenerativeModel):
    """VAE whose encoder and decoder both see the one-hot class label."""

    name = "cvae"
    config_class = CVAEConfig
    presets = PRESETS
    uses_labels = True

    def __init__(self, data_spec: DataSpec, config: Optional[CVAEConfig] = None):
        super().__init__(data_spec)
        config = config or self.config_class()
        self.config = config
        if config.latent_dim < 1:
            raise DGMError(f"latent_dim must be >= 1, got {config.latent_dim}")
        if config.num_classes < 2:
            raise DGMError(f"num_classes must be >= 2, got {config.num_classes}")
        self.likelihood = likelihood_for(data_spec, config.gaussian_scale, config.learn_scale, config.decoder_scale)
        d, k, latent = data_spec.dim, config.num_classes, config.latent_dim
        self.encoder = MLP(d + k, config.encoder_hidden, 2 * latent, config.activation)
        self.decoder = MLP(latent + k, config.decoder_hidden, self.likelihood.num_outputs(), config.activation)

    # --- labels -------------------------------------------------------------------------
    def check_labels(self, y: Tensor, num_rows: int, what: str = "labels") -> None:
        super().check_labels(y, num_rows, what)
        low = -1 if self.accepts_unlabelled else 0
        if y.numel() and (int(y.min()) < low or int(y.max()) >= self.config.num_classes):
            unlabelled = " or -1 (unlabelled)" if self.accepts_unlabelled else ""
            hint = "" if self.accepts_unlabelled else "; for partly labelled data use m2"
            raise DataError(
                f"{what}: expected classes 0..{self.config.num_classes - 1}{unlabelled}, found values in "
                f"[{int(y.min())}, {int(y.max())}] (set num_classes to the number of classes{hint})"
            )

    def _batch_labels(self, x: Tensor, y: Optional[Tensor]) -> Tensor:
        """The labels of the batch ``x`` (shape checked without a host sync)."""
        if y is None:
            raise DGMError(f"{type(self).__name__} is conditioned on the class: call it with labels y=")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            got = f"{y.dtype} {list(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise DataError(f"labels y: expected int64 of shape [{x.shape[0]}], got {got}")
        return y

    def one_hot(self, y: Tensor) -> Tensor:
        dtype = next(self.parameters()).dtype
        return nn.functional.one_hot(y, self.config.num_classes).to(dtype)

    # --- networks -------------------------------------------------------------------------
    def prior(self, like: Tensor) -> dist.TorchDistribution:
        return standard_normal(like, self.config.latent_dim)

    def posterior(self, x: Tensor, y: Tensor) -> dist.TorchDistribution:
        """``q(z | x, y)``, a diagonal Gaussian whose batch shape is that of ``y``
        broadcast against ``[B]``."""
        h = concat(x.reshape(x.shape[0], -1), self.one_hot(y))
        return diagonal_normal(self.encoder(h), self.config.min_posterior_scale)

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """The decoder's raw output (the likelihood's parameters) for latents and labels."""
        return self.decoder(concat(z, self.one_hot(y)))

    # --- Pyro program -----------------------------------------------------------------------
    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None, y: Optional[Tensor] = None):
        y = self._batch_labels(x, y)
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(self.decode(z, y)), obs=x)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None, y: Optional[Tensor] = None):
        q = self.posterior(x, self._batch_labels(x, y))
        with self.data_plate(x, idx, size):
            pyro.sample("z", q)

    # --- everything else ---------------------------------------------------------------------
    def default_labels(self, n: int) -> Tensor:
        """Classes for ``sample(n)`` without labels: each class in turn."""
        return torch.arange(n, device=self.device) % self.config.num_classes

    def _sample_labels(self, n: int, y: Union[None, int, Tensor]) -> Tensor:
        if y is None:
            return self.default_labels(n)
        y = torch.as_tensor(y, device=self.device)
        y = y.expand(n) if y.dim() == 0 else y
        self.check_labels(y.long(), n, "sample labels y")
        return y.long()

    @torch.no_grad()
    def sample(self, n: int, y: Union[None, int, Tensor] = None, mean: bool = False) -> Tensor:
        """``n`` samples of ``x | y`` (``y``: one class for all, ``[n]`` classes, or
        ``None``); ``mean=True`` returns the decoder means instead."""
        y = self._sample_labels(n, y)
        z = self.prior(self.one_hot(y)).sample((n,))
        raw = self.decode(z, y)
        return self.likelihood.mean(raw) if mean else self.likelihood(raw).sample()

    @torch.no_grad()
    def decode_mean(self, z: Tensor, y: Tensor) -> Tensor:
        """Decoder means of ``x`` given latents ``z [n, L]`` and classes ``y [n]``."""
        return self.likelihood.mean(self.decode(z, y))

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor) -> Tensor:
        """Posterior means ``E_q[z | x, y]``: the style of ``x`` written as class ``y``."""
        return self.posterior(x, y).mean

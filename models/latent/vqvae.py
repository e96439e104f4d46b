"""VQ-VAE: a convolutional autoencoder with a vector-quantized latent grid (van den Oord,
Vinyals and Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017).

Generative program (``model``), for an ``H x W`` single-channel image and a ``h x w`` grid
(``h = H / 2^s`` after ``s`` stride-2 convolutions; MNIST 28 x 28 -> 7 x 7)::

    k_c ~ Uniform{1 .. K}                   for every grid cell c, independently
    z   = (e_{k_c})_c                       a [D, h, w] map of codebook vectors
    x | z ~ likelihood(decoder(z))          Bernoulli (binary), categorical or Gaussian pixels

Guide (the encoder): deterministic, ``q(k | x)`` is one-hot at the nearest codes of
``z_e = encoder(x)``. The ELBO is then exact and simple::

    ELBO(x) = log p(x | z_q(x)) + log p(z_q) - log q(z_q | x) = log p(x | z_q(x)) - h w log K

(the KL of a one-hot ``q`` from the uniform prior is ``h w log K``), a true lower bound on
``log p(x)``, and ``-ELBO`` is the NLL upper bound with the uniform prior. A learned prior
over code grids tightens it (``experiments/code_prior.py``):
``-log p(x) <= -log p(x | z_q(x)) - log p_prior(k(x))``.

**The straight-through estimator as a Pyro program.** The latent site ``"z"`` takes the
quantized *vectors* ``[D, h, w]`` as its value, not the indices. The guide samples it from
``Delta(straight_through(z_e, z_q), event_dim=3)``: a reparameterized site (log-density 0)
whose value is exactly ``z_q`` (a codebook member) and whose gradient is copied to ``z_e``
(:func:`models.nn.quantize.straight_through`). The model's site ``"z"`` has the uniform
prior over codebook maps (:class:`models.nn.quantize.UniformCodebook`, log-mass
``-h w log K``), and the decoder reads the replayed value, so the ordinary pathwise ELBO
gradient of ``log p(x | z)`` reaches the encoder through the copy, and the encoder, decoder
and codebook receive exactly the paper's gradients with no training code in the model.

**Auxiliary losses.** The commitment loss ``beta ||z_e - sg(z_q)||^2`` (and, with
``ema=False``, the codebook loss ``||sg(z_e) - z_q||^2``) enter the training loss through
``GenerativeModel.add_aux_loss`` (``models/base.py``): the objective adds them to the loss
and logs them as ``aux/commitment`` (``aux/codebook``), never to the reported bound. The
batch's codebook perplexity is logged as the training metric ``perplexity``.

**EMA codebook** (default; the paper's Appendix A.1): the codebook is updated in the guide's
forward pass only while ``self.updating`` (training mode, inside a training step of the
objective, not during validation, evaluation or the objective's structure probe), so
resumed runs repeat the uninterrupted one. The codebook and its running sums are buffers
and travel with checkpoints.

Architecture (the paper's, Section 4.1/4.2): encoder = ``s`` convolutions ``4 x 4`` stride 2
(ReLU), residual blocks ``ReLU, 3 x 3 conv, ReLU, 1 x 1 conv``, a ``1 x 1`` conv to ``D``;
decoder = a ``3 x 3`` conv from ``D``, the same residual blocks, ``s`` transposed
convolutions ``4 x 4`` stride 2. Preset ``paper``: 256 channels, 2 residual blocks,
``K = 512``, ``D = 64``, ``beta = 0.25``, EMA decay 0.99 (their ImageNet/CIFAR setting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from models.autoregressive.pixelcnn import raster_shape
from models.base import DataSpec, DGMError, GenerativeModel
from models.nn import likelihood_for
from models.nn.quantize import Quantized, UniformCodebook, VectorQuantizer
from models.registry import register_model


@dataclass
class VQVAEConfig:
    num_codes: int = 64  # K
    code_dim: int = 16  # D
    channels: int = 64
    num_res_blocks: int = 2
    num_downsamples: int = 2  # stride-2 convolutions: a 28 x 28 image becomes a 7 x 7 grid
    commitment: float = 0.25  # beta
    ema: bool = True  # EMA codebook; False: the codebook loss trains it
    decay: float = 0.99
    epsilon: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_code_threshold: float = 0.0  # restart codes whose EMA count falls below this (0: never)
    gaussian_scale: Optional[float] = None  # real data: initial decoder scale (learned)


PRESETS = {
    "paper": VQVAEConfig(num_codes=512, code_dim=64, channels=256, num_res_blocks=2),
    "cpu": VQVAEConfig(num_codes=64, code_dim=16, channels=32, num_res_blocks=1, dead_code_threshold=0.5),
    "small": VQVAEConfig(num_codes=8, code_dim=4, channels=8, num_res_blocks=1),
}


class _Residual(nn.Module):
    """``x + conv_1x1(relu(conv_3x3(relu(x))))`` (the paper's residual block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def _encoder(cfg: VQVAEConfig) -> nn.Sequential:
    layers = []
    for i in range(cfg.num_downsamples):
        layers += [nn.Conv2d(1 if i == 0 else cfg.channels, cfg.channels, 4, stride=2, padding=1), nn.ReLU()]
    layers += [_Residual(cfg.channels) for _ in range(cfg.num_res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(cfg.channels, cfg.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: VQVAEConfig, out_channels: int) -> nn.Sequential:
    layers = [nn.Conv2d(cfg.code_dim, cfg.channels, 3, padding=1)]
    layers += [_Residual(cfg.channels) for _ in range(cfg.num_res_blocks)]
    for i in range(cfg.num_downsamples):
        last = i == cfg.num_downsamples - 1
        layers += [nn.ReLU(), nn.ConvTranspose2d(cfg.channels, out_channels if last else cfg.channels, 4, 2, 1)]
    return nn.Sequential(*layers)


@register_model
class VQVAE(GenerativeModel):
    """VQ-VAE with a uniform prior over code grids; see the module docstring."""

    # the straight-through gradient needs the pathwise estimator (elbo-sf detaches the guide's
    # sample) and the commitment loss needs an objective that collects auxiliary losses
    objectives = ("elbo", "iwae")

    name = "vqvae"
    config_class = VQVAEConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[VQVAEConfig] = None):
        super().__init__(data_spec)
        cfg = config or VQVAEConfig()
        self.config = cfg
        self.height, self.width = raster_shape(data_spec, "VQ-VAE")
        if cfg.num_downsamples < 1:
            raise DGMError(f"VQ-VAE: num_downsamples must be >= 1, got {cfg.num_downsamples}")
        step = 2**cfg.num_downsamples
        if self.height % step or self.width % step:
            raise DGMError(
                f"VQ-VAE: {cfg.num_downsamples} stride-2 convolutions need height and width divisible by {step}, "
                f"got {self.height} x {self.width}; lower num_downsamples"
            )
        if cfg.channels < 1 or cfg.num_res_blocks < 0 or cfg.commitment < 0:
            raise DGMError("VQ-VAE: channels must be >= 1, num_res_blocks >= 0 and commitment >= 0")
        self.grid = (self.height // step, self.width // step)
        self.likelihood = likelihood_for(data_spec, cfg.gaussian_scale)
        self.out_channels = self.likelihood.params_per_dim
        self.encoder = _encoder(cfg)
        self.decoder = _decoder(cfg, self.out_channels)
        self.quantizer = VectorQuantizer(
            cfg.num_codes, cfg.code_dim, cfg.ema, cfg.decay, cfg.epsilon, cfg.dead_code_threshold
        )

    # --- networks -----------------------------------------------------------------------
    def encode_maps(self, x: Tensor) -> Tensor:
        """``z_e [B, D, h, w]``."""
        return self.encoder(x.reshape(x.shape[0], 1, self.height, self.width))

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw likelihood parameters ``[..., H * W * P]`` (pixel-major, ``P`` per pixel) of
        code maps ``z [..., D, h, w]``."""
        lead = z.shape[:-3]
        maps = self.decoder(z.reshape((-1,) + tuple(z.shape[-3:])))  # [N, P, H, W]
        return maps.permute(0, 2, 3, 1).reshape(lead + (-1,))

    def quantize(self, x: Tensor) -> Quantized:
        return self.quantizer(self.encode_maps(x), update=self.updating and self.config.ema)

    # --- Pyro program -------------------------------------------------------------------
    def prior(self) -> UniformCodebook:
        return UniformCodebook(self.quantizer.codebook, self.grid)

    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decode_raw(z)), obs=x)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        q = self.quantize(x)
        self.add_aux_loss("commitment", self.config.commitment * q.commitment)
        if not self.config.ema:
            self.add_aux_loss("codebook", q.codebook_loss)
        self.add_metric("perplexity", q.perplexity)
        with self.data_plate(x, idx, size):
            pyro.sample("z", dist.Delta(q.z_q, event_dim=3))

    # --- everything else -----------------------------------------------------------------
    @property
    def grid_shape(self) -> Tuple[int, int]:
        return self.grid

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Code indices ``[B, h, w]`` (int64) of the nearest codes; never updates the codebook."""
        return self.quantizer(self.encode_maps(x)).indices

    def log_likelihood(self, x: Tensor, codes: Tensor) -> Tensor:
        """``log p(x | z = codebook[codes])`` per datapoint ``[B]`` for indices ``[B, h, w]``."""
        return self.likelihood(self.decode_raw(self.quantizer.lookup(codes))).log_prob(x)

    @torch.no_grad()
    def decode(self, codes: Tensor, mean: bool = True) -> Tensor:
        """Images ``[n, *event_shape]`` from code indices ``[n, h, w]``: the likelihood's mean,
        or a sample (``mean=False``)."""
        raw = self.decode_raw(self.quantizer.lookup(codes))
        return self.likelihood.mean(raw) if mean else self.likelihood(raw).sample()

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` ancestral samples under the uniform prior (codes drawn independently)."""
        codes = torch.randint(self.config.num_codes, (n,) + self.grid, device=self.quantizer.codebook.device)
        return self.decode(codes, mean=mean)

"""Invertible layers of normalizing flows, each with its log-determinant.

Convention. Every layer acts on a flat batch ``[B, D]`` and runs in the *density direction*
(data towards the base distribution) as ``forward(x) -> (y, log|det dy/dx|)``, and back as
``inverse(y) -> (x, log|det dx/dy|)``; both log-determinants are per datapoint, ``[B]``, and
``logdet_inverse(f(x)) = -logdet_forward(x)``. A flow ``f = f_K o ... o f_1`` then has, by the
change of variables,

    log p(x) = log p_base(f(x)) + sum_k log|det J_{f_k}(x_{k-1})|,    x_0 = x, x_k = f_k(x_{k-1}),

and is sampled as ``x = f_1^{-1}(... f_K^{-1}(z))`` with ``z ~ p_base``.

Layers:

* :class:`AdditiveCoupling` (NICE, Dinh et al. 2014): ``y_A = x_A``, ``y_B = x_B + t(x_A)``;
  volume preserving, ``log|det| = 0``.
* :class:`AffineCoupling` (Real NVP, Dinh et al. 2016): ``y_A = x_A``,
  ``y_B = x_B * exp(s(x_A)) + t(x_A)``; ``log|det| = sum_B s``. The Jacobian is triangular
  (after permuting A before B) with diagonal ``1`` on A and ``exp(s)`` on B.
  Which coordinates form ``A`` is a mask, built by the pure functions below: alternating
  or half (vectors), checkerboard and channel (images).
* :class:`DiagonalScaling` (NICE's final layer): ``y = x * exp(s)``, ``log|det| = sum s``.
* :class:`ActNorm` (Glow, Kingma & Dhariwal 2018): ``y = (x - b) * exp(s)`` with ``b, s``
  set from the first training batch so that its output has zero mean and unit variance.
* :class:`BatchNormFlow` (Dinh et al. 2016, Sec. 3.7; Papamakarios et al. 2017, Sec. 3.4):
  ``y = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta``, ``log|det| = sum(log_gamma - 0.5
  log(v + eps))``; ``m, v`` are the minibatch moments in training (treated as constants in the
  log-determinant, as in both papers) and running averages in eval mode and in ``inverse``.
* :class:`Permutation` / :func:`reverse`: ``y = x[:, perm]``, ``log|det| = 0``.
* :class:`MaskedAffineAutoregressive` (MAF, Papamakarios et al. 2017): a Gaussian MADE gives
  ``mu_i(x_<i)`` and ``alpha_i(x_<i)``; ``u_i = (x_i - mu_i) exp(-alpha_i)``,
  ``log|det| = -sum_i alpha_i``. The density direction is one network pass; the inverse,
  ``x_i = u_i exp(alpha_i) + mu_i``, needs ``D`` sequential passes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from models.autoregressive.made import made_masks
from models.base import DGMError
from models.nn.masked import MaskedLinear, hidden_degrees
from models.nn.mlp import ACTIVATIONS, MLP

__all__ = [
    "Transform",
    "AdditiveCoupling",
    "AffineCoupling",
    "DiagonalScaling",
    "ActNorm",
    "BatchNormFlow",
    "Permutation",
    "reverse",
    "GaussianMADE",
    "MaskedAffineAutoregressive",
    "NORMALIZATIONS",
    "MASKS",
    "coupling_mask",
    "alternating_mask",
    "half_mask",
    "checkerboard_mask",
    "channel_mask",
]


class Transform(nn.Module):
    """An invertible map of flat ``[B, D]`` batches with per-datapoint log-determinants."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)``: data towards noise."""
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)``: noise towards data."""
        raise NotImplementedError


# --- coupling masks (True = kept: the part A that conditions the rest) ------------------------------


def alternating_mask(dim: int, parity: int) -> Tensor:
    """Coordinates ``i`` with ``i % 2 == parity`` are kept (NICE's odd/even partition)."""
    return torch.arange(dim) % 2 == parity


def half_mask(dim: int, parity: int) -> Tensor:
    """The first ``ceil(D / 2)`` coordinates are kept (parity 0) or changed (parity 1)."""
    first = torch.arange(dim) < (dim + 1) // 2
    return first if parity == 0 else ~first


def _image(image_shape: Optional[Sequence[int]], dim: int, kind: str) -> Tuple[int, int, int]:
    if image_shape is None or math.prod(image_shape) != dim or len(image_shape) not in (2, 3):
        raise DGMError(
            f"a {kind} mask needs image data whose image_shape (H, W) or (C, H, W) has {dim} pixels, "
            f"got image_shape={image_shape}; use mask='alternating' or 'half' for vectors"
        )
    return (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)


def checkerboard_mask(image_shape: Sequence[int], parity: int) -> Tensor:
    """Pixels ``(i, j)`` with ``(i + j) % 2 == parity`` are kept, in every channel (Real NVP)."""
    c, h, w = _image(image_shape, math.prod(image_shape), "checkerboard")
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == parity
    return board.expand(c, h, w).flatten()


def channel_mask(image_shape: Sequence[int], parity: int) -> Tensor:
    """Real NVP's channel-wise mask: the first ``C // 2`` channels are kept (parity 0).

    A one-channel image is first viewed squeezed (each 2x2 block becomes 4 channels, Real
    NVP Sec. 3.6); half of those channels is the top row of every block, so the kept pixels
    are the even rows (parity 0) or the odd ones. Nothing is reshaped: only the mask differs.
    """
    c, h, w = _image(image_shape, math.prod(image_shape), "channel")
    if c >= 2:
        first = torch.arange(c) < c // 2
        return (first if parity == 0 else ~first)[:, None, None].expand(c, h, w).flatten()
    if h % 2:
        raise DGMError(f"a channel mask of a one-channel image squeezes 2x2 blocks: needs an even height, got {h}")
    rows = torch.arange(h) % 2 == parity
    return rows[:, None].expand(h, w).flatten()


def _on_image(mask_fn, kind: str):
    """A :data:`MASKS` entry for an image mask: checks the image shape against ``dim`` first."""
    return lambda dim, image_shape, parity: mask_fn(_image(image_shape, dim, kind), parity)


MASKS = {
    "alternating": lambda dim, image_shape, parity: alternating_mask(dim, parity),
    "half": lambda dim, image_shape, parity: half_mask(dim, parity),
    "checkerboard": _on_image(checkerboard_mask, "checkerboard"),
    "channel": _on_image(channel_mask, "channel"),
}
"""Coupling masks by name: ``(dim, image_shape, parity) -> bool [D]``, True where kept."""


def coupling_mask(kind: str, dim: int, image_shape: Optional[Sequence[int]], parity: int) -> Tensor:
    """The boolean ``[D]`` mask of kind ``kind`` (see :data:`MASKS`) with the given parity."""
    if kind not in MASKS:
        raise DGMError(f"unknown mask {kind!r}; choose from {', '.join(MASKS)}")
    return MASKS[kind](dim, image_shape, parity)


# --- couplings ------------------------------------------------------------------------------------


class _Coupling(Transform):
    """Shared split/merge of coupling layers: ``params = net(x_A)`` sets the map of ``x_B``.
    Subclasses implement ``couple(x_B, params, inverse) -> (new x_B, logdet)``.

    ``zero_init`` (default: the class's ``zero_init``) zeroes the conditioner's output layer,
    so the layer starts as the identity map, a standard stabilizer of deep flows."""

    params_per_dim = 1
    zero_init = True

    def __init__(self, mask: Tensor, hidden: Sequence[int], activation: str = "relu", zero_init: Optional[bool] = None):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise DGMError("a coupling mask must be a 1-D boolean vector with kept and changed coordinates both")
        if activation not in ACTIVATIONS:
            raise DGMError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.register_buffer("kept", mask.nonzero().squeeze(-1))
        self.register_buffer("changed", (~mask).nonzero().squeeze(-1))
        self.net = MLP(len(self.kept), hidden, self.params_per_dim * len(self.changed), activation)
        if type(self).zero_init if zero_init is None else zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def couple(self, x_b: Tensor, params: Tensor, inverse: bool) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _map(self, x: Tensor, inverse: bool) -> Tuple[Tensor, Tensor]:
        new, logdet = self.couple(x[:, self.changed], self.net(x[:, self.kept]), inverse)
        return x.index_copy(1, self.changed, new), logdet

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self._map(x, inverse=False)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        return self._map(y, inverse=True)


class AdditiveCoupling(_Coupling):
    """NICE: ``y_B = x_B + t(x_A)``; volume preserving.

    Not zero-initialized by default: with ``t = 0`` and data symmetric under ``x_B -> -x_B``
    given ``x_A`` (rings, a centred Gaussian), the gradient of the log-likelihood in ``t`` is
    ``E[d log p_base(z_B) / d z_B | x_A] = 0``, so a zero shift is a stationary point that
    training never leaves (only the diagonal scaling learns). Affine couplings escape it
    through their scales."""

    zero_init = False

    def couple(self, x_b: Tensor, t: Tensor, inverse: bool) -> Tuple[Tensor, Tensor]:
        return (x_b - t if inverse else x_b + t), x_b.new_zeros(x_b.shape[0])


class AffineCoupling(_Coupling):
    """Real NVP: ``y_B = x_B * exp(s(x_A)) + t(x_A)``, ``log|det| = sum s``.

    ``scale="tanh"`` bounds the log-scale as ``s = c * tanh(raw)`` with a learned ``c`` per
    coordinate (Real NVP's stabilizer); ``scale="exp"`` uses ``s = raw`` unbounded.
    """

    params_per_dim = 2

    def __init__(self, mask: Tensor, hidden: Sequence[int], activation: str = "relu", scale: str = "tanh", **kw):
        if scale not in ("tanh", "exp"):
            raise DGMError(f"unknown coupling scale {scale!r}; use 'tanh' or 'exp'")
        super().__init__(mask, hidden, activation, **kw)
        self.scale = scale
        self.tanh_scale = nn.Parameter(torch.ones(len(self.changed))) if scale == "tanh" else None

    def log_scale(self, raw: Tensor) -> Tensor:
        return self.tanh_scale * torch.tanh(raw) if self.tanh_scale is not None else raw

    def couple(self, x_b: Tensor, params: Tensor, inverse: bool) -> Tuple[Tensor, Tensor]:
        raw, t = params.chunk(2, dim=-1)
        s = self.log_scale(raw)
        if inverse:
            return (x_b - t) * torch.exp(-s), -s.sum(-1)
        return x_b * torch.exp(s) + t, s.sum(-1)


# --- elementwise affine layers --------------------------------------------------------------------


class DiagonalScaling(Transform):
    """NICE's last layer: ``y = x * exp(s)``, ``log|det| = sum s`` (``s`` starts at 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        return y * torch.exp(-self.log_scale), -self.log_scale.sum().expand(y.shape[0])


class ActNorm(Transform):
    """``y = (x - b) * exp(s)`` per coordinate, with data-dependent initialization.

    The first ``forward`` in training mode on a batch of at least two points sets
    ``b = mean(x)`` and ``s = -log std(x)``, so that batch leaves the layer standardized;
    afterwards ``b, s`` are ordinary parameters. Until then the layer is the identity (an
    eval-mode call never changes it). ``initialized`` is a buffer, so it survives checkpoints.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        self.loc.copy_(x.mean(0))
        self.log_scale.copy_(-torch.log(x.std(0, unbiased=False) + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.training and x.shape[0] > 1 and not bool(self.initialized):
            self.initialize(x.detach())
        return (x - self.loc) * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        return y * torch.exp(-self.log_scale) + self.loc, -self.log_scale.sum().expand(y.shape[0])


class BatchNormFlow(Transform):
    """Batch normalization as an invertible layer (Real NVP Sec. 3.7, MAF Sec. 3.4).

    Training: ``m, v`` are the minibatch mean and (biased) variance, and running averages
    ``r <- (1 - momentum) r + momentum * batch`` are kept. Eval mode and ``inverse`` (which
    samples, and has no batch to normalize) use the running averages, as does a training
    batch of one point; so the round trip ``inverse(forward(x)) = x`` holds exactly in eval mode.
    Running averages lag behind the layers below as they train; the MAF paper instead sets
    the eval statistics from the whole training set after training
    (:meth:`models.flows.base.FlowModel.set_batch_norm_statistics`).
    """

    def __init__(self, dim: int, momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        if not 0 < momentum <= 1:
            raise DGMError(f"batch-norm momentum must be in (0, 1], got {momentum}")
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.momentum, self.eps = momentum, eps

    def _moments(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.training or x.shape[0] < 2:
            return self.running_mean, self.running_var
        mean, var = x.mean(0), x.var(0, unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        return mean, var

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mean, var = self._moments(x)
        log_std = 0.5 * torch.log(var + self.eps)
        y = (x - mean) * torch.exp(self.log_gamma - log_std) + self.beta
        return y, (self.log_gamma - log_std).sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        log_std = 0.5 * torch.log(self.running_var + self.eps)
        x = (y - self.beta) * torch.exp(log_std - self.log_gamma) + self.running_mean
        return x, (log_std - self.log_gamma).sum().expand(y.shape[0])


NORMALIZATIONS = {"batch": BatchNormFlow, "act": ActNorm}
"""Normalization layers placed between couplings / autoregressive layers, by name."""


# --- permutations -------------------------------------------------------------------------------


class Permutation(Transform):
    """``y = x[:, perm]``; volume preserving."""

    def __init__(self, perm: Tensor):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if not torch.equal(perm.sort().values, torch.arange(len(perm))):
            raise DGMError(f"not a permutation of 0..{len(perm) - 1}: {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        return y[:, self.inverse_perm], y.new_zeros(y.shape[0])


def reverse(dim: int) -> Permutation:
    """The order-reversing permutation."""
    return Permutation(torch.arange(dim - 1, -1, -1))


# --- MAF ----------------------------------------------------------------------------------------------


class GaussianMADE(nn.Module):
    """A MADE (Germain et al. 2015) with two outputs per coordinate, ``(mu_i, alpha_i)``,
    each a function of the ``x_j`` earlier than ``i`` in ``order`` only.

    Masks come from :func:`models.autoregressive.made.made_masks` (inputs of degree
    ``order position``, hidden degrees cycling through ``1..D-1``, strict output masks); the
    output layer starts at zero, so the layer starts as the identity map.
    """

    def __init__(self, dim: int, hidden: Sequence[int], order: Tensor, activation: str = "relu"):
        super().__init__()
        if not hidden or any(h < 1 for h in hidden):
            raise DGMError(f"a MADE needs at least one hidden layer of size >= 1, got {tuple(hidden)}")
        if activation not in ACTIVATIONS:
            raise DGMError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        order = torch.as_tensor(order, dtype=torch.long)
        if not torch.equal(order.sort().values, torch.arange(dim)):
            raise DGMError(f"order must be a permutation of 0..{dim - 1}")
        self.dim = dim
        self.register_buffer("order", order)
        degrees = torch.cat(hidden_degrees(hidden, dim, random=False))
        masks, _ = made_masks(order, degrees, hidden, levels_in=1, levels_out=2)
        sizes = [dim, *hidden, 2 * dim]
        self.layers = nn.ModuleList(MaskedLinear(a, b, m) for a, b, m in zip(sizes[:-1], sizes[1:], masks))
        self.activation = ACTIVATIONS[activation]()
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(mu, alpha)``, each ``[B, D]``."""
        h = x
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        mu, alpha = self.layers[-1](h).unflatten(-1, (self.dim, 2)).unbind(-1)
        return mu, alpha


class MaskedAffineAutoregressive(Transform):
    """One MAF layer: ``u_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i))``.

    The Jacobian ``du/dx`` is triangular in ``order`` with diagonal ``exp(-alpha_i)``, so
    ``log|det| = -sum_i alpha_i``: one pass of the MADE. The inverse fills ``x`` in ``order``,
    one MADE pass per coordinate; after the last pass every ``alpha_i`` has seen its final
    ``x_<i``, so that pass also gives the inverse's ``log|det| = sum_i alpha_i``.
    """

    def __init__(self, dim: int, hidden: Sequence[int], order: Optional[Tensor] = None, activation: str = "relu"):
        super().__init__()
        self.made = GaussianMADE(dim, hidden, torch.arange(dim) if order is None else order, activation)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mu, alpha = self.made(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(-1)

    def inverse(self, u: Tensor) -> Tuple[Tensor, Tensor]:
        x = torch.zeros_like(u)
        positions = torch.arange(u.shape[1], device=u.device)
        for i in self.made.order.tolist():
            mu, alpha = self.made(x)
            x = torch.where(positions == i, u * torch.exp(alpha) + mu, x)  # out of place: differentiable
        return x, alpha.sum(-1)

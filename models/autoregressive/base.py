"""The shared shape of fully observed autoregressive models.

``p(x) = prod_i p(x_i | x_<i)`` has an exact ``log_prob``, computed from the data itself in
one (teacher-forced) pass, and ancestral ``sample``. The Pyro program is one observed site
whose distribution wraps those two methods, so the runner, the objectives and the
estimators treat these models like any other: there are no latent sites, the guide is
empty, the log-weights are the exact log-likelihood (for every K), and the ELBO equals
log p(x).

A subclass implements ``conditional_log_probs(x) -> [B, D]`` (``log p(x_i | x_<i)`` for
each dimension of the flattened datapoint, in the data's own indexing whatever the
generation order) and ``sample(n, given=None) -> [n, *event_shape]``; ``log_prob`` sums
the conditionals. Tests prove causality through the gradients of the conditionals.

Completion (inpainting) is conditional ancestral sampling: ``given`` is a tensor
``[n, *event_shape]`` holding known values and NaN where values are to be drawn. Known
values are clamped as sampling proceeds, which draws exactly from ``p(x_unknown | x_known)``
when every known position precedes every unknown one in the generation order (the top half
of a raster-scanned image); :meth:`AutoregressiveModel.known_mask` refuses anything else.

Conditional models: a subclass built with ``context_dim > 0`` (PixelCNN, Gated PixelCNN and
char-RNN as the decoders of ``models/latent/ar_vae.py``) models ``p(x | h)`` for a context
vector ``h`` and takes ``context [B, context_dim]`` in its density and sampling calls,
checked by :meth:`AutoregressiveModel.check_context`.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.autograd.function import once_differentiable

from models.base import DGMError, GenerativeModel

_SUPPORTS = {"binary": constraints.boolean, "real": constraints.real}


def tied_preactivations(contrib: Tensor, c: Tensor) -> Tensor:
    """``a_i = c + sum_{j < i} contrib_j`` for every ``i``, from ``contrib [B, D, H]``
    (``contrib_j = W_{:, j} e(x_j)``) and ``c [H]``: the exclusive cumulative sum over the
    dimension axis that gives NADE-style tied-weight models all hidden states in one pass
    (RNADE's; NADE fuses it with its sigmoid and read-out, ``nade.TiedSigmoidLayer``).
    One ``[B, D, H]`` tensor forward and one backward, where ``cumsum`` + ``cat`` under
    autograd made about seven (a flip, zero-filled slice gradients)."""
    return _TiedPreactivations.apply(contrib, c)


def _sequential(t: Tensor) -> bool:
    """Running sums as a loop over ``[B, H]`` slices (CPU) or as ``cumsum`` kernels (elsewhere)."""
    return t.device.type == "cpu"


def _scan_(t: Tensor, reverse: bool = False) -> Tensor:
    """In place along axis 1: ``t[:, i] <- sum_{j <= i} t[:, j]`` (``reverse``: ``j >= i``). On a
    CPU a loop over the ``[B, H]`` slices (each add stays in cache; faster than ``cumsum`` along
    a middle axis), elsewhere ``cumsum``."""
    if _sequential(t):
        steps = range(t.shape[1] - 2, -1, -1) if reverse else range(1, t.shape[1])
        for i in steps:
            t[:, i] += t[:, i + 1] if reverse else t[:, i - 1]
        return t
    return t.copy_(t.flip(1).cumsum(1).flip(1)) if reverse else t.cumsum_(1)


class _TiedPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, contrib: Tensor, c: Tensor) -> Tensor:
        ctx.c_shape = c.shape
        a = torch.empty_like(contrib, memory_format=torch.contiguous_format)
        a[:, 0] = c
        a[:, 1:] = contrib[:, :-1]
        return _scan_(a)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        # d/dcontrib_j = sum_{i > j} grad_i: a reverse inclusive scan shifted by one position
        g_contrib = torch.empty_like(grad, memory_format=torch.contiguous_format)
        g_contrib[:, :-1] = grad[:, 1:]
        g_contrib[:, -1] = 0
        _scan_(g_contrib, reverse=True)
        g_c = (g_contrib[:, 0] + grad[:, 0]).sum_to_size(ctx.c_shape) if ctx.needs_input_grad[1] else None
        return g_contrib, g_c


class AutoregressiveDistribution(dist.TorchDistribution):
    """A distribution over whole datapoints backed by an autoregressive model's exact
    ``log_prob`` and ancestral ``sample``. Plates may expand its batch shape; ``log_prob``
    returns one value per datapoint of ``value`` and broadcasts against that shape."""

    arg_constraints = {}
    has_rsample = False

    def __init__(self, model: "AutoregressiveModel", batch_shape=torch.Size()):
        self.ar_model = model
        super().__init__(torch.Size(batch_shape), torch.Size(model.data_spec.event_shape), validate_args=False)

    @property
    def support(self):
        spec = self.ar_model.data_spec
        if spec.support == "categorical":
            base = constraints.integer_interval(0, spec.num_levels - 1)
        else:
            base = _SUPPORTS[spec.support]
        return constraints.independent(base, len(spec.event_shape))

    def expand(self, batch_shape, _instance=None):
        return AutoregressiveDistribution(self.ar_model, batch_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        event_dims = len(self.event_shape)
        flat = value.reshape((-1,) + tuple(value.shape[value.dim() - event_dims :]))
        lp = self.ar_model.log_prob(flat).reshape(value.shape[: value.dim() - event_dims])
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        n = shape.numel()
        return self.ar_model.sample(n).reshape(shape + self.event_shape)


class AutoregressiveModel(GenerativeModel):
    """Base class: a fully observed model with exact ``log_prob`` and ancestral ``sample``."""

    has_exact_log_prob = True
    fully_observed = True
    context_dim: int = 0  # > 0: a conditional model p(x | h), h of this size (see the module docstring)

    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            pyro.sample("x", AutoregressiveDistribution(self), obs=x)

    def conditional_log_probs(self, x: Tensor) -> Tensor:
        """``[B, D]``: ``log p(x_i | x_<i)`` per dimension of the flattened datapoint."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` per datapoint, in nats: the sum of the conditionals."""
        return self.conditional_log_probs(x).sum(-1)

    def sample(self, n: int, given: Optional[Tensor] = None) -> Tensor:
        """``[n, *event_shape]`` ancestral samples; ``given`` clamps known values (NaN = draw)."""
        raise NotImplementedError

    def check_context(self, context: Optional[Tensor], n: int) -> None:
        """Refuse a missing or misshapen ``context`` of a conditional model (``[n, context_dim]``),
        and any context for an unconditional one."""
        name = type(self).__name__
        if self.context_dim == 0:
            if context is not None:
                raise DGMError(f"{name} was built without conditioning (context_dim=0) but was given a context")
            return
        if context is None or tuple(context.shape) != (n, self.context_dim):
            got = "none" if context is None else f"shape {list(context.shape)}"
            raise DGMError(
                f"{name} is conditional (context_dim={self.context_dim}): pass context of shape "
                f"[{n}, {self.context_dim}], got {got}"
            )

    def known_mask(self, given: Optional[Tensor], n: int, order: Optional[Tensor] = None) -> Optional[Tensor]:
        """Check ``given`` for ``sample(n, given)`` and return its flat known mask ``[n, D]``
        (``None`` if ``given`` is ``None``). ``order`` is the generation order (positions of
        the flattened datapoint, first drawn first; the natural order if ``None``): a known
        position after an unknown one would make clamping a heuristic, not a conditional
        sample, so it is refused."""
        if given is None:
            return None
        shape = (n,) + tuple(self.data_spec.event_shape)
        if tuple(given.shape) != shape:
            raise DGMError(f"given must have shape {list(shape)} (NaN where to sample), got {list(given.shape)}")
        known = ~torch.isnan(given.reshape(n, -1))
        if order is not None:
            known = known[:, order.to(known.device)]
        if (known[:, 1:] & ~known[:, :-1]).any():
            raise DGMError(
                "conditional sampling needs every known position to come before every unknown one "
                "in the generation order (e.g. the top half of an image for a raster-order model); "
                "this model's order puts a known position after an unknown one"
            )
        if order is not None:
            known = ~torch.isnan(given.reshape(n, -1))
        return known.to(self.device)

    def clamp(self, x: Tensor, given: Optional[Tensor], known: Optional[Tensor], position) -> Tensor:
        """Overwrite ``x[:, position]`` (flat ``[n, D]`` samples) with the known values of
        ``given`` where ``known``; returns ``x``. ``position`` is an int or an index tensor."""
        if known is not None:
            flat = given.reshape(given.shape[0], -1).to(x)  # given may live on another device
            k = known[:, position]
            x[:, position] = torch.where(k, flat[:, position], x[:, position])
        return x

"""Normalizing-flow guides: any amortized guide's Gaussian pushed through a learned flow.

The base guide (by default the model's own encoder, ``model.guide``) gives each real-valued
latent site a distribution ``q0(z | x)``, typically a diagonal Gaussian. ``FlowGuide``
intercepts that sample statement and replaces ``q0`` by its push-forward through ``K``
invertible steps, ``z_K = f_K o ... o f_1(z_0)``, ``z_0 ~ q0(z | x)``, whose density is the
change of variables::

    log q(z_K | x) = log q0(z_0 | x) - sum_k log |det d f_k / d z_{k-1}|

Sampling stays reparameterized (``z_0 = loc + scale * eps``, every ``f_k`` differentiable),
so the pathwise ELBO and IWAE gradients apply. The density is evaluated at the guide's own
samples through the transforms' one-element cache (each step remembers its last
``(z_{k-1}, z_k)``), so no step is ever inverted in training; only IAF has an inverse for
densities at other points (``elbo-sf`` detaches the samples, which needs it).

Amortization: each step's parameters are a function of a context ``c(x)``; generically (no
access to the encoder's hidden layer) ``c`` is the base distribution's own parameters for
that datapoint, ``(loc, log scale)`` of ``q0(z | x)``, flattened.

Steps (``STEPS``):

* ``iaf``, inverse autoregressive flow (Kingma et al. 2016, eqs. 10-14): a MADE with
  context input gives ``(m, s) = MADE(z_<i, c)`` and the numerically stable LSTM-type update
  ``z' = sigmoid(s) * z + (1 - sigmoid(s)) * m``, ``log |det| = sum_i log sigmoid(s_i)``
  (the Jacobian is triangular in the step's order). The order is reversed between steps.
* ``planar`` (Rezende & Mohamed 2015, eq. 10): ``f(z) = z + u_hat tanh(w^T z + b)``,
  ``log |det| = log |1 + u_hat^T psi(z)|``, ``psi = tanh'(w^T z + b) w``. Invertibility
  needs ``w^T u_hat >= -1`` (their appendix A.1): ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2``
  with ``m(a) = -1 + softplus(a)``.
* ``radial`` (Rezende & Mohamed 2015, eq. 14): ``f(z) = z + beta h(alpha, r) (z - z0)``,
  ``h = 1 / (alpha + r)``, ``r = |z - z0|``; ``log |det| = (d - 1) log(1 + beta h)
  + log(1 + beta h + beta h'(r) r)``. Invertible for ``alpha > 0``, ``beta >= -alpha``:
  ``alpha = softplus(a)``, ``beta = -alpha + softplus(b)``.

``(u, w, b)`` and ``(z0, a, b)`` come from a one-hidden-layer tanh network of the context,
one network per step. Sites with discrete or constrained support pass through unchanged, and
so do global latent sites (outside the data plate: the flow is amortized per datapoint); a
site's event of any shape is flattened to a vector for the flow and reshaped back.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions.transforms import ReshapeTransform, Transform
from torch.nn import functional as F

from inference.config import GuideConfig
from inference.guides import GUIDES, Guide
from models.base import DATA_PLATE, DGMError, GenerativeModel
from models.nn import MLP
from models.nn.masked import MaskedLinear, connectivity_mask, order_degrees

__all__ = ["FlowGuide", "IAFStep", "IAFTransform", "PlanarStep", "PlanarTransform", "RadialStep", "RadialTransform"]

IAF_GATE_BIAS = 2.0  # sigmoid(2) = 0.88: each IAF step starts close to the identity (Kingma et al. 2016, sec. 4)


class _FlowTransform(Transform):
    """A bijection of ``R^d`` acting on the last dim (``event_dim = 1``), batched over the rest."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self) -> None:
        super().__init__(cache_size=1)


# --- IAF ----------------------------------------------------------------------------------
class _ContextMADE(nn.Module):
    """MADE (Germain et al. 2015) over ``z in R^d`` with an unmasked context ``c``: outputs
    ``(m, s)`` where ``m_i, s_i`` see ``z_j`` only for ``j`` before ``i`` in ``order``.

    Degrees: ``z`` inputs have their order degree (1..d), context inputs degree 0; hidden
    units get degrees 0..d-1 (a degree-0 unit sees the context alone, so the first variable
    in the order still depends on x); an output of degree ``k`` sees hidden units of degree
    ``< k`` (strict).
    """

    def __init__(self, dim: int, context_dim: int, hidden: Tuple[int, ...], order: Tensor) -> None:
        super().__init__()
        self.dim = dim
        z_deg = order_degrees(order)
        in_deg = torch.cat([z_deg, torch.zeros(context_dim, dtype=z_deg.dtype)])
        degrees = [in_deg] + [torch.arange(h) % dim for h in hidden]
        out_deg = z_deg.repeat(2)
        layers = [
            MaskedLinear(len(a), len(b), connectivity_mask(a, b, strict=False)) for a, b in zip(degrees, degrees[1:])
        ]
        layers.append(MaskedLinear(len(degrees[-1]), 2 * dim, connectivity_mask(degrees[-1], out_deg, strict=True)))
        self.layers = nn.ModuleList(layers)
        self.register_buffer("order", order.clone())
        with torch.no_grad():
            self.layers[-1].weight.mul_(0.1)
            self.layers[-1].bias.zero_()
            self.layers[-1].bias[dim:] = IAF_GATE_BIAS

    def forward(self, z: Tensor, context: Tensor) -> Tuple[Tensor, Tensor]:
        h = torch.cat([z, context.expand(z.shape[:-1] + context.shape[-1:])], dim=-1)
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        m, s = self.layers[-1](h).split(self.dim, dim=-1)
        return m, s


class IAFTransform(_FlowTransform):
    """``z' = sigmoid(s) * z + (1 - sigmoid(s)) * m``, ``(m, s) = made(z, context)``."""

    def __init__(self, made: _ContextMADE, context: Tensor) -> None:
        super().__init__()
        self.made, self.context = made, context
        self._last: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)

    def _gate(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self._last[0] is x:
            return self._last[1]
        m, s = self.made(x, self.context)
        self._last = (x, (m, s))
        return m, s

    def _call(self, x: Tensor) -> Tensor:
        m, s = self._gate(x)
        gate = torch.sigmoid(s)
        return gate * x + (1 - gate) * m

    def _inverse(self, y: Tensor) -> Tensor:
        # x_i = (y_i - (1 - g_i) m_i) / g_i with (m_i, g_i) functions of x_<i: after pass k
        # the first k variables in the order are exact, so d passes invert exactly.
        x = torch.zeros_like(y)
        for _ in range(self.made.dim):
            m, s = self.made(x, self.context)
            gate = torch.sigmoid(s)
            x = (y - (1 - gate) * m) / gate
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return F.logsigmoid(self._gate(x)[1]).sum(-1)


class IAFStep(nn.Module):
    """One amortized IAF step; ``reverse`` flips the autoregressive order."""

    def __init__(self, dim: int, context_dim: int, hidden: int, reverse: bool = False) -> None:
        super().__init__()
        order = torch.arange(dim).flip(0) if reverse else torch.arange(dim)
        self.made = _ContextMADE(dim, context_dim, (hidden,), order)

    def transform(self, context: Tensor) -> IAFTransform:
        return IAFTransform(self.made, context)


# --- planar -------------------------------------------------------------------------------
class PlanarTransform(_FlowTransform):
    """``f(z) = z + u_hat tanh(w^T z + b)`` with ``u_hat`` the invertible reparameterization
    of ``u``; ``u, w [..., d]``, ``b [..., 1]`` broadcast against ``z``."""

    def __init__(self, u: Tensor, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.u, self.w, self.b = u, w, b
        wu = (w * u).sum(-1, keepdim=True)
        self.w_u_hat = F.softplus(wu) - 1  # = w^T u_hat >= -1
        self.u_hat = u + (self.w_u_hat - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-12)

    def _pre(self, x: Tensor) -> Tensor:
        return (self.w * x).sum(-1, keepdim=True) + self.b

    def _call(self, x: Tensor) -> Tensor:
        return x + self.u_hat * torch.tanh(self._pre(x))

    def _inverse(self, y: Tensor) -> Tensor:
        raise DGMError(
            "a planar flow has no closed-form inverse: its density is known only at its own samples "
            "(elbo, iwae, is), not at detached ones (elbo-sf); use --guide iaf there"
        )

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # det(I + u_hat psi^T) = 1 + psi^T u_hat = 1 + tanh'(a) w^T u_hat > 0 (matrix determinant lemma)
        dtanh = 1 - torch.tanh(self._pre(x)).pow(2)
        return torch.log1p(dtanh * self.w_u_hat).squeeze(-1)


class PlanarStep(nn.Module):
    """``(u, w, b) = net(context)``: one planar step per datapoint."""

    def __init__(self, dim: int, context_dim: int, hidden: int, reverse: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.net = _hypernet(context_dim, hidden, 2 * dim + 1)

    def transform(self, context: Tensor) -> PlanarTransform:
        u, w, b = self.net(context).split([self.dim, self.dim, 1], dim=-1)
        return PlanarTransform(u, w, b)


# --- radial -------------------------------------------------------------------------------
class RadialTransform(_FlowTransform):
    """``f(z) = z + beta (z - z0) / (alpha + |z - z0|)`` with ``alpha = softplus(a) > 0`` and
    ``beta = -alpha + softplus(b) >= -alpha``."""

    def __init__(self, z0: Tensor, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.z0, self.a, self.b = z0, a, b
        self.alpha = F.softplus(a)
        self.beta = -self.alpha + F.softplus(b)

    def _radius(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        diff = x - self.z0
        return diff, diff.pow(2).sum(-1, keepdim=True).sqrt()

    def _call(self, x: Tensor) -> Tensor:
        diff, r = self._radius(x)
        return x + self.beta * diff / (self.alpha + r)

    def _inverse(self, y: Tensor) -> Tensor:
        raise DGMError(
            "this radial flow's inverse is not implemented: its density is known only at its own samples "
            "(elbo, iwae, is), not at detached ones (elbo-sf); use --guide iaf there"
        )

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        _, r = self._radius(x)
        h = 1 / (self.alpha + r)
        d = x.shape[-1]
        # 1 + beta h + beta h'(r) r = 1 + beta alpha h^2
        logdet = (d - 1) * torch.log1p(self.beta * h) + torch.log1p(self.beta * self.alpha * h * h)
        return logdet.squeeze(-1)


class RadialStep(nn.Module):
    """``(z0, a, b) = net(context)``: one radial step per datapoint."""

    def __init__(self, dim: int, context_dim: int, hidden: int, reverse: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.net = _hypernet(context_dim, hidden, dim + 2)

    def transform(self, context: Tensor) -> RadialTransform:
        z0, a, b = self.net(context).split([self.dim, 1, 1], dim=-1)
        return RadialTransform(z0, a, b)


def _hypernet(context_dim: int, hidden: int, out_dim: int) -> MLP:
    """Context -> step parameters; the output layer starts small, so the step starts near
    the identity without sitting at the saddle ``u = w = 0``."""
    net = MLP(context_dim, (hidden,), out_dim, "tanh")
    with torch.no_grad():
        net[-1].weight.mul_(0.1)
    return net


STEPS = {"iaf": IAFStep, "planar": PlanarStep, "radial": RadialStep}


# --- the guide ----------------------------------------------------------------------------
def _is_real(fn) -> bool:
    support = fn.support
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    return base is constraints.real


def _module_key(name: str) -> str:
    return "site_" + "".join(ch if ch.isalnum() else "_" for ch in name)


class _PushForward(Messenger):
    """Replace each flowed site's ``q0`` by its push-forward; runs inside any particle plate
    the caller adds, so the flow is built on the per-datapoint ``q0`` and expanded after."""

    def __init__(self, guide: "FlowGuide") -> None:
        super().__init__()
        self.guide = guide

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and msg["name"] in self.guide.site_shapes:
            msg["fn"] = self.guide.push_forward(msg["name"], msg["fn"])


class FlowGuide(Guide):
    """``base_guide`` (default ``model.guide``) with every real latent site pushed through
    ``depth`` amortized flow steps of kind ``flow`` (``iaf``, ``planar`` or ``radial``).

    The steps are sized at construction by tracing the base guide once on two rows of
    ``data`` (so the optimizer and checkpoints see every parameter from the start). A
    ``base_guide`` that is an ``nn.Module`` is registered as a submodule and trained with
    the flow; ``model.guide``'s encoder stays the model's.
    """

    def __init__(
        self,
        model: GenerativeModel,
        data: Tensor,
        flow: str = "iaf",
        depth: int = 2,
        hidden: Optional[int] = None,
        base_guide: Optional[Callable] = None,
    ) -> None:
        super().__init__()
        if flow not in STEPS:
            raise DGMError(f"unknown flow {flow!r}; choose from {', '.join(STEPS)}")
        if depth < 1:
            raise DGMError(f"a flow guide needs depth >= 1, got {depth}")
        if hidden is not None and hidden < 1:
            raise DGMError(f"flow hidden width must be >= 1, got {hidden}")
        self.flow, self.depth = flow, depth
        self.base = base_guide if base_guide is not None else model.guide
        self.site_shapes, dtype = self._trace_sites(data[: min(2, data.shape[0])])
        self.steps = nn.ModuleDict()
        for name, event_shape in self.site_shapes.items():
            d = event_shape.numel()
            width = hidden or max(16, 4 * d)
            if _module_key(name) in self.steps:
                raise DGMError(f"latent sites {name!r} and another one map to the same module name; rename one")
            self.steps[_module_key(name)] = nn.ModuleList(
                STEPS[flow](d, 2 * d, width, reverse=bool(k % 2)) for k in range(depth)
            )
        self.steps.to(dtype=dtype, device=data.device)

    def _trace_sites(self, x: Tensor) -> Tuple[Dict[str, torch.Size], torch.dtype]:
        n = x.shape[0]
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
            trace = poutine.trace(self.base).get_trace(x, torch.arange(n, device=x.device), n)
        shapes, dtype = {}, x.dtype
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if not any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
                continue  # a global latent (decoder weights): its guide stays as it is, no flow per datapoint
            if _is_real(site["fn"]):
                shapes[name] = site["fn"].event_shape
                dtype = site["value"].dtype
        if not shapes:
            raise DGMError(
                "the guide has no real-valued latent site for a flow to act on; use --guide amortized or local"
            )
        return shapes, dtype

    def context(self, base: dist.Distribution) -> Tensor:
        """``(loc, log scale)`` of ``q0(z | x)``, flattened: ``[*batch, 2 d]``."""
        shape = base.batch_shape + (base.event_shape.numel(),)
        try:
            loc, scale = base.mean, base.stddev
        except NotImplementedError as e:
            raise DGMError(f"a flow guide needs a base distribution with a mean and scale, got {base}") from e
        return torch.cat([loc.reshape(shape), scale.clamp_min(1e-30).log().reshape(shape)], dim=-1)

    def transforms(self, name: str, base: dist.Distribution) -> list:
        """The site's flow as transforms on ``base``'s event, reshaping to vectors and back."""
        event = base.event_shape
        flat = torch.Size((event.numel(),))
        context = self.context(base)
        steps = [step.transform(context) for step in self.steps[_module_key(name)]]
        if event == flat:
            return steps
        return [ReshapeTransform(event, flat, cache_size=1)] + steps + [ReshapeTransform(flat, event, cache_size=1)]

    def push_forward(self, name: str, base: dist.Distribution) -> dist.TransformedDistribution:
        if base.event_shape != self.site_shapes[name]:
            raise DGMError(
                f"site {name!r} had event shape {tuple(self.site_shapes[name])} when the flow was built, "
                f"now {tuple(base.event_shape)}"
            )
        return dist.TransformedDistribution(base, self.transforms(name, base))

    def forward(self, *args, **kwargs):
        with _PushForward(self):
            return self.base(*args, **kwargs)

    def describe(self) -> str:
        return f"{self.flow} x{self.depth}"


def _flow_factory(flow: str):
    def build(config: GuideConfig, model: GenerativeModel, data: Tensor) -> FlowGuide:
        return FlowGuide(model, data, flow, depth=config.flow_depth, hidden=config.flow_hidden)

    return build


for _flow, _what in (("iaf", "inverse autoregressive"), ("planar", "planar"), ("radial", "radial")):
    GUIDES.add(_flow, _flow_factory(_flow), f"the encoder's q(z | x) pushed through --flow-depth {_what} flow steps")

"""Latent-space tools for any model with an amortized guide and continuous latent sites.

* ``encode``: run the guide with every latent site set to its mean, in the guide's order,
  so a hierarchical guide's later sites condition on the earlier means
  (``h1 = E_q[h1 | x]``, ``h2 = E_q[h2 | h1]``); for a one-site Gaussian encoder this is its
  ``loc``. Guides without an analytic mean (flow guides) use a Monte Carlo average.
* ``decode``: run the model with its latent sites conditioned on given values and return the
  mean of the observed site, ``E[x | z]``.
* ``interpolate``: encode two datapoints and decode points on the path between their
  codes, linear (``(1 - t) a + t b``) or spherical (slerp, Shoemake 1985; White 2016 for
  latent spaces: ``sin((1 - t) w) / sin w * a + sin(t w) / sin w * b`` with ``w`` the angle
  between ``a`` and ``b``, which under a ``N(0, I)`` prior keeps intermediate codes at the
  typical radius instead of cutting through the low-density centre).
* ``projection``: 2-D coordinates of posterior means (the means themselves if 2-D, else their
  top two principal components), for a scatter coloured by label.
* ``save_*``: PNGs of interpolations, projections and reconstructions (``dgm latent``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
import torch  # noqa: E402
from pyro.poutine.messenger import Messenger  # noqa: E402
from pyro.poutine.util import prune_subsample_sites  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions import Categorical, Independent  # noqa: E402

from experiments.plots import grid_cmap, image_grid  # noqa: E402
from inference.device import eval_mode  # noqa: E402
from models.base import DataSpec, DGMError, GenerativeModel  # noqa: E402

Latents = Dict[str, Tensor]
METHODS = ("slerp", "linear")
WHAT = ("interpolate", "project", "reconstruct", "analogies", "style")


def _mean(fn, num_samples: int = 64) -> Tensor:
    try:
        return fn.mean
    except NotImplementedError:
        return fn.sample((num_samples,)).mean(0)


class _AtMean(Messenger):
    """Set every latent sample site to its distribution's mean (after the plates have
    broadcast it), so downstream sites condition on the mean."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            fn = msg["fn"]
            if fn.support.is_discrete:
                raise DGMError(f"latent site {msg['name']!r} is discrete; the latent tools need continuous latents")
            msg["value"] = _mean(fn)
            msg["done"] = True


@torch.no_grad()
def encode(guide: Callable, x: Tensor) -> Latents:
    """``{site: [N, *site shape]}``: the guide's means at ``x`` (see the module docstring)."""
    n = x.shape[0]
    trace = prune_subsample_sites(poutine.trace(_AtMean()(guide)).get_trace(x, torch.arange(n, device=x.device), n))
    codes = {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    if not codes:
        raise DGMError("the guide has no latent sites: the model has no latent space to explore")
    return codes


@torch.no_grad()
def decode(model: GenerativeModel, codes: Latents) -> Tensor:
    """``E[x | latents]`` ``[N, *event_shape]`` of the model's observed site."""
    n = next(iter(codes.values())).shape[0]
    dummy = torch.zeros((n,) + tuple(model.data_spec.event_shape), device=model.device)
    trace = prune_subsample_sites(poutine.trace(poutine.condition(model.model, data=codes)).get_trace(dummy))
    sites = {name: s for name, s in trace.nodes.items() if s["type"] == "sample"}
    missing = [name for name, s in sites.items() if not s["is_observed"]]
    if missing:
        raise DGMError(f"decode needs values for every latent site; missing {missing}")
    observed = [s for name, s in sites.items() if name not in codes]
    if len(observed) != 1:
        raise DGMError(f"{type(model).__name__}: expected one observed site, found {len(observed)}")
    return _expected_value(observed[0]["fn"]).reshape(dummy.shape)


def _expected_value(fn) -> Tensor:
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if isinstance(base, Categorical):  # levels 0..K-1 stored as floats
        levels = torch.arange(base.probs.shape[-1], dtype=base.probs.dtype, device=base.probs.device)
        return (base.probs * levels).sum(-1)
    return fn.mean


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """``(1 - t) a + t b`` for each ``t``: ``[T, *a.shape]``."""
    t = t.reshape((-1,) + (1,) * a.dim()).to(a.dtype)
    return (1 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation along the last dim: ``[T, *a.shape]``. The direction moves
    along the great circle from ``a / |a|`` to ``b / |b|`` at constant angular speed
    (``sin((1 - t) w) / sin w * u_a + sin(t w) / sin w * u_b``, ``w`` their angle) and the
    norm goes linearly from ``|a|`` to ``|b|``; for equal norms this is the usual slerp of
    ``a`` and ``b``. Nearly parallel directions fall back to normalized lerp."""
    t = t.reshape((-1,) + (1,) * a.dim()).to(a.dtype)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    parallel = sin.abs() < eps
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(parallel, t, torch.sin(t * omega) / safe)
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    return ((1 - t) * na + t * nb) * direction


def interpolate(
    model: GenerativeModel, guide: Callable, x0: Tensor, x1: Tensor, steps: int = 8, method: str = "slerp"
) -> Tensor:
    """Decoded means along the path between the codes of ``x0`` and ``x1`` (single
    datapoints ``[*event]``): ``[steps, *event]``; every latent site is interpolated."""
    if method not in METHODS:
        raise DGMError(f"unknown interpolation {method!r}; choose from {', '.join(METHODS)}")
    if steps < 2:
        raise DGMError(f"--steps must be >= 2, got {steps}")
    codes = encode(guide, torch.stack([x0, x1]))
    t = torch.linspace(0, 1, steps, device=x0.device)
    path = {name: (slerp if method == "slerp" else lerp)(c[0], c[1], t) for name, c in codes.items()}
    return decode(model, path)


def projection(means: Tensor) -> Tensor:
    """``[N, 2]``: the means if 2-D (1-D gets a zero second axis), else their projection on
    the top two principal components (centred, via SVD)."""
    flat = means.reshape(means.shape[0], -1).double()
    if flat.shape[1] <= 2:
        return torch.nn.functional.pad(flat, (0, 2 - flat.shape[1]))
    centred = flat - flat.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:2].T


# --- pictures ------------------------------------------------------------------------------------
def _check_images(spec: DataSpec, what: str) -> None:
    if spec.image_shape is None:
        raise DGMError(f"{what} draws images; the dataset has no image shape (use --what project)")


def _save_grid(rows: Tensor, spec: DataSpec, path: Path, nrow: int, title: str) -> Path:
    if spec.support == "categorical":
        rows = rows / (spec.num_levels - 1)
    elif spec.support == "real":  # any real range: rescale to [0, 1] for display
        rows = (rows - rows.min()) / (rows.max() - rows.min()).clamp_min(1e-12)
    grid = image_grid(rows.float().cpu(), spec.image_shape, nrow=nrow)
    n_rows = math.ceil(rows.shape[0] / nrow)
    fig = plt.figure(figsize=(max(nrow * 0.8, 3), max(n_rows * 0.8, 1.5)), dpi=100)
    plt.imshow(grid.numpy(), cmap=grid_cmap(), vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    plt.title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_interpolations(
    model: GenerativeModel,
    guide: Callable,
    x: Tensor,
    path: Path,
    pairs: int = 4,
    steps: int = 8,
    method="slerp",
    label: Optional[str] = None,
) -> Path:
    """One row per pair ``(x[2i], x[2i+1])``: the two originals at the ends, decoded means
    of ``steps`` interpolated codes between them. ``label`` (the run) heads the title."""
    _check_images(model.data_spec, "interpolate")
    if x.shape[0] < 2 * pairs:
        raise DGMError(f"interpolating {pairs} pairs needs {2 * pairs} datapoints, got {x.shape[0]}")
    flat = x.reshape(x.shape[0], -1)
    rows = []
    with eval_mode(model):
        for i in range(pairs):
            between = interpolate(model, guide, x[2 * i], x[2 * i + 1], steps, method).reshape(steps, -1)
            rows += [flat[2 * i : 2 * i + 1], between, flat[2 * i + 1 : 2 * i + 2]]
    title = f"{label or type(model).__name__}: {method} interpolation between test points (decoder means)"
    return _save_grid(torch.cat(rows), model.data_spec, path, steps + 2, title)


def save_reconstructions(
    model: GenerativeModel, guide: Callable, x: Tensor, path: Path, label: Optional[str] = None
) -> Path:
    """Pairs of rows: originals, then the decoder means at their encodings."""
    _check_images(model.data_spec, "reconstruct")
    with eval_mode(model):
        recon = decode(model, encode(guide, x))
    n, nrow = x.shape[0], min(x.shape[0], 10)
    flat, recon = x.reshape(n, -1), recon.reshape(n, -1)
    rows = torch.cat([torch.cat([flat[i : i + nrow], recon[i : i + nrow]]) for i in range(0, n, nrow)])
    title = f"{label or type(model).__name__}: originals / reconstructions"
    return _save_grid(rows, model.data_spec, path, nrow, title)


def save_projection(
    model: GenerativeModel,
    guide: Callable,
    x: Tensor,
    path: Path,
    labels: Optional[Tensor] = None,
    site=None,
    label: Optional[str] = None,
) -> Path:
    """Scatter of the 2-D projection of the posterior means of ``site`` (default: the
    guide's last site, the top of a hierarchy), coloured by ``labels`` when given."""
    with eval_mode(model):
        codes = encode(guide, x)
    if site is None:
        site = list(codes)[-1]
    if site not in codes:
        raise DGMError(f"no latent site {site!r}; the guide has {', '.join(codes)}")
    xy = projection(codes[site]).float().cpu()
    fig = plt.figure(figsize=(6, 5), dpi=100)
    colour = None if labels is None else labels.cpu().numpy()
    points = plt.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=colour, s=4, cmap="tab10", alpha=0.7)
    if labels is not None:
        plt.colorbar(points, label="label")
    dim = codes[site].reshape(x.shape[0], -1).shape[1]
    axes = "posterior means" if dim <= 2 else "first two principal components of the posterior means"
    if dim <= 2:
        plt.xlabel(f"E[{site}_1 | x]")
        plt.ylabel(f"E[{site}_2 | x]" if dim == 2 else "(one-dimensional code)")
    else:
        plt.xlabel(f"principal component 1 of E[{site} | x]")
        plt.ylabel(f"principal component 2 of E[{site} | x]")
    plt.title(f"{label or type(model).__name__}: site {site!r} ({dim}-D), {axes}", fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def run_latent(run_dir: Path, what: str, out: Optional[Path] = None, n: int = 1000, **kwargs) -> Path:
    """``dgm latent``: load a run and draw ``what`` (interpolate | project | reconstruct; for
    class-conditional models analogies | style) from its test data into ``out`` (default
    ``RUN/latent-WHAT.png``)."""
    from experiments.runs import load_run

    if what not in WHAT:
        raise DGMError(f"unknown --what {what!r}; choose from {', '.join(WHAT)}")
    run = load_run(run_dir)
    if run.guide.refit_on_new_data:
        raise DGMError(
            f"{run_dir} has a {run.guide.describe()} guide, which cannot encode new data; train with --guide amortized"
        )
    out = Path(out) if out is not None else Path(run_dir) / f"latent-{what}.png"
    label = f"{Path(run_dir).name} ({run.config.describe()})"  # the run, in every picture's title
    data = run.data
    x = data.test.to(run.device)
    model, guide = run.model, run.guide
    if what in ("analogies", "style"):  # class-conditional models: fix z, vary y
        from experiments.conditional_plots import save_analogies, save_style_grid

        if what == "style":
            return save_style_grid(model, out, label=label)
        return save_analogies(model, out, x, data.test_labels, n=kwargs.get("images", 8), label=label)
    if model.uses_labels:
        raise DGMError(
            f"{run.config.model.name} is class-conditional: its latent space is explored with --what analogies or style"
        )
    if what == "project":
        labels = None if data.test_labels is None else data.test_labels[:n]
        return save_projection(model, guide, x[:n], out, labels, kwargs.get("site"), label=label)
    if what == "reconstruct":
        return save_reconstructions(model, guide, x[: min(n, kwargs.get("images", 20))], out, label=label)
    return save_interpolations(
        model,
        guide,
        x,
        out,
        kwargs.get("pairs", 4),
        kwargs.get("steps", 8),
        kwargs.get("method", "slerp"),
        label=label,
    )

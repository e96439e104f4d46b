"""Pictures of 2-D densities: the data, the model's density on a grid, and its samples.

For any model with an exact ``log_prob`` on 2-D real data (flows, RNADE, ...)::

    from experiments.density_plots import plot_run
    plot_run("runs/realnvp-moons")            # writes runs/realnvp-moons/density.png

The density panel shows ``p(x) = exp(log_prob(x))`` on a regular grid (with the grid's
Riemann sum of ``p`` in the title: close to 1 when the view holds the model's mass, so a
badly normalized model is visible at a glance; grid points where ``log_prob`` is not finite
are drawn as 0 and counted in the title), between a 2-D histogram of the data and a
scatter of the model's samples on the same axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from inference.device import eval_mode  # noqa: E402
from models.base import DGMError, GenerativeModel  # noqa: E402

Bounds = Tuple[float, float, float, float]  # x_min, x_max, y_min, y_max


def view_bounds(data: Optional[Tensor], pad: float = 0.15, default: float = 4.0) -> Bounds:
    """A square-ish view around the data's 0.1%..99.9% quantiles, padded by ``pad`` of its width."""
    if data is None:
        return (-default, default, -default, default)
    lo = torch.quantile(data.double(), 0.001, dim=0)
    hi = torch.quantile(data.double(), 0.999, dim=0)
    margin = pad * (hi - lo)
    lo, hi = lo - margin, hi + margin
    return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))


@torch.no_grad()
def density_on_grid(model: GenerativeModel, bounds: Bounds, resolution: int = 200) -> Tuple[Tensor, Tensor, Tensor]:
    """``(xs [R], ys [R], density [R, R])`` with ``density[i, j] = p(xs[j], ys[i])`` (rows
    are y, as ``imshow`` wants), evaluated in eval mode in chunks."""
    if tuple(model.data_spec.event_shape) != (2,) or not model.has_exact_log_prob:
        raise DGMError(
            f"a density plot needs a model with an exact log_prob on 2-D data; {type(model).__name__} "
            f"models {model.data_spec.describe()}" + ("" if model.has_exact_log_prob else " without an exact log_prob")
        )
    xs = torch.linspace(bounds[0], bounds[1], resolution)
    ys = torch.linspace(bounds[2], bounds[3], resolution)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    ref = next(model.parameters())
    with eval_mode(model):
        log_p = torch.cat([model.log_prob(chunk.to(ref)).cpu() for chunk in points.split(10_000)])
    return xs, ys, log_p.exp().reshape(resolution, resolution).float()


def save_density_plot(
    model: GenerativeModel,
    path,
    data: Optional[Tensor] = None,
    n_samples: int = 2000,
    bounds: Optional[Bounds] = None,
    resolution: int = 200,
    title: Optional[str] = None,
) -> Path:
    """Write a PNG: data histogram (if ``data``), model density, and ``n_samples`` model samples."""
    bounds = bounds or view_bounds(data)
    xs, ys, density = density_on_grid(model, bounds, resolution)
    bad = int((~torch.isfinite(density)).sum())  # e.g. exp(-alpha) overflowing far from the data
    density = torch.nan_to_num(density, nan=0.0, posinf=0.0)
    mass = float(density.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))
    with eval_mode(model), torch.no_grad():
        samples = model.sample(n_samples).detach().float().cpu()
    panels = 3 if data is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4.3), dpi=100)
    extent = (bounds[0], bounds[1], bounds[2], bounds[3])
    if data is not None:
        axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=resolution // 2, range=[extent[:2], extent[2:]])
        axes[0].set_title(f"data ({len(data)} points)")
    axes[-2].imshow(density.numpy(), origin="lower", extent=extent, aspect="auto", interpolation="nearest")
    axes[-2].set_title(f"model density (mass in view {mass:.3f})" + (f"\n{bad} grid points not finite" if bad else ""))
    axes[-1].scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, alpha=0.4)
    axes[-1].set_xlim(*extent[:2])
    axes[-1].set_ylim(*extent[2:])
    axes[-1].set_title(f"{n_samples} model samples")
    for ax in axes:
        ax.set_aspect("equal", adjustable="box")
    fig.suptitle(title or type(model).__name__)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_run(run_dir, path=None, split: str = "train", max_points: int = 20_000) -> Path:
    """The density plot of a finished 2-D run (its best weights), next to ``split`` of its data;
    written to ``run_dir/density.png`` unless ``path`` is given."""
    from experiments.runs import load_run

    run = load_run(Path(run_dir))
    if run.model.data_spec.dim != 2 or not run.model.has_exact_log_prob:
        raise DGMError(
            f"{run_dir} is a {run.config.describe()} run ({run.model.data_spec.dim}-D): density plots need "
            "2-D data and a model with exact log p(x) (flows, Gaussian mixtures); use `dgm sample` instead"
        )
    x = getattr(run.data, split)[:max_points]
    out = Path(path) if path is not None else Path(run_dir) / "density.png"
    return save_density_plot(run.model, out, data=x.cpu(), title=run.config.describe())

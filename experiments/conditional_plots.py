"""Pictures of class-conditional models (``cvae``, ``m2``): analogies and style grids.

* ``save_analogies``: each row fixes one latent z (a writing style) and the columns vary the
  class y, as in Kingma et al. 2014, figure 1. With images ``x`` and their labels, z is
  the posterior mean ``E_q[z | x, y]`` and the row starts with the original image; without,
  z is drawn from the prior.
* ``save_style_grid``: each row fixes one class and the columns are independent draws of z.

Both show decoder means ``E[x | y, z]`` and tile them with ``experiments.plots.image_grid``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import torch
from torch import Tensor

from experiments.plots import grid_cmap, image_grid
from inference.device import eval_mode
from models.base import DGMError
from models.latent.cvae import CVAE


def _check(model) -> None:
    if not isinstance(model, CVAE):
        raise DGMError(f"{type(model).__name__} is not class-conditional; analogies need cvae or m2")
    if model.data_spec.image_shape is None:
        raise DGMError("analogies need image data (the dataset has no image shape)")


@torch.no_grad()
def analogy_grid(model, z: Tensor) -> Tensor:
    """Decoder means for every (z row, class) pair: ``[n * K, D]``, row-major in z."""
    k = model.config.num_classes
    n = z.shape[0]
    classes = torch.arange(k, device=z.device).repeat(n)
    return model.decode_mean(z.repeat_interleave(k, dim=0), classes).reshape(n * k, -1)


def _save(grid_images: Tensor, model, path: Path, nrow: int, title: str) -> Path:
    spec = model.data_spec
    grid = image_grid(grid_images.float().cpu(), spec.image_shape, nrow=nrow)
    if spec.support == "categorical":
        grid = grid / (spec.num_levels - 1)
    fig = plt.figure(figsize=(0.6 * nrow + 1, 0.6 * (grid_images.shape[0] // nrow) + 1), dpi=100)
    plt.imshow(grid.numpy(), cmap=grid_cmap(), vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    plt.title(title)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_analogies(
    model, path: Path, x: Optional[Tensor] = None, y: Optional[Tensor] = None, n: int = 8, label: Optional[str] = None
) -> Path:
    """Rows of one style each, columns the classes 0..K-1 (after the original ``x`` when
    given: z is then inferred from ``x[:n]`` and its labels ``y[:n]``)."""
    _check(model)
    with eval_mode(model), torch.no_grad():
        if x is None:
            z = model.prior(next(model.parameters())).sample((n,))
            images = analogy_grid(model, z)
            nrow = model.config.num_classes
        else:
            if y is None:
                raise DGMError("inferring the style of images needs their labels y")
            x, y = x[:n].to(model.device), y[:n].to(model.device)
            z = model.encode(x, y)
            rows = analogy_grid(model, z).reshape(len(z), model.config.num_classes, -1)
            images = torch.cat([x.reshape(len(z), 1, -1).to(rows.dtype), rows], dim=1).reshape(-1, rows.shape[-1])
            nrow = model.config.num_classes + 1
    return _save(images, model, path, nrow, f"{label or type(model).__name__}: fixed z per row, class y per column")


def save_style_grid(model, path: Path, per_class: int = 10, label: Optional[str] = None) -> Path:
    """One row per class, ``per_class`` independent styles z per row."""
    _check(model)
    k = model.config.num_classes
    with eval_mode(model), torch.no_grad():
        classes = torch.arange(k, device=model.device).repeat_interleave(per_class)
        z = model.prior(next(model.parameters())).sample((len(classes),))
        images = model.decode_mean(z, classes)
    title = f"{label or type(model).__name__}: class y per row, random z per column"
    return _save(images, model, path, per_class, title)

"""Pictures of models: sample grids for images, scatter plots for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from inference.runner import eval_mode  # noqa: E402
from models.base import DataSpec  # noqa: E402


def image_grid(x: torch.Tensor, image_shape, nrow: int) -> torch.Tensor:
    """Tile ``[n, prod(image_shape)]`` images into one ``[rows*H, nrow*W]`` array."""
    h, w = image_shape[-2:]
    n = x.shape[0]
    rows = math.ceil(n / nrow)
    canvas = torch.ones(rows * (h + 1) + 1, nrow * (w + 1) + 1)
    imgs = x.reshape(n, -1)[:, -h * w :].reshape(n, h, w)  # first channel of multi-channel data
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = imgs[i]
    return canvas


def save_samples(model, spec: DataSpec, path: Path, n: int = 64) -> Path:
    """Draw ``n`` samples from ``model`` and save them as a PNG."""
    with eval_mode(model), torch.no_grad():
        x = model.sample(n).detach().float().cpu()
    fig = plt.figure(figsize=(6, 6), dpi=100)
    if spec.image_shape is not None:
        grid = image_grid(x, spec.image_shape, nrow=int(math.ceil(math.sqrt(n))))
        if spec.support == "categorical":
            grid = grid / (spec.num_levels - 1)
        plt.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        plt.axis("off")
    else:
        plt.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=3, alpha=0.5)
        plt.gca().set_aspect("equal")
    plt.title(f"{type(model).__name__}: {n} samples")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)

"""Pictures of models: sample grids for images, scatter plots for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from inference.device import eval_mode  # noqa: E402
from models.base import DataSpec, DGMError  # noqa: E402

FRAME_COLOUR = "#9ec5e8"
"""The colour of the one-pixel frame between tiles: light, and neither ink nor paper."""


def image_grid(x: torch.Tensor, image_shape, nrow: int) -> torch.Tensor:
    """Tile ``[n, prod(image_shape)]`` images into one ``[rows*H, nrow*W]`` array; the
    frame between tiles is NaN, which :func:`grid_cmap` draws in ``FRAME_COLOUR``."""
    h, w = image_shape[-2:]
    n = x.shape[0]
    rows = math.ceil(n / nrow)
    canvas = torch.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), float("nan"))
    imgs = x.reshape(n, -1)[:, -h * w :].reshape(n, h, w)  # first channel of multi-channel data
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = imgs[i]
    return canvas


def grid_cmap():
    """White paper, black ink, and the frame of :func:`image_grid` (NaN) in ``FRAME_COLOUR``."""
    return plt.get_cmap("gray_r").with_extremes(bad=FRAME_COLOUR)


def save_samples(model, spec: DataSpec, path: Path, n: int = 64, title: str = "") -> Path:
    """Draw ``n`` samples from ``model`` and save them as a PNG (``.png`` is added to a
    path without a suffix), titled with ``title`` (the run) and the count; returns the path written."""
    path = Path(path)
    path = path if path.suffix else path.with_name(path.name + ".png")
    with eval_mode(model), torch.no_grad():
        x = model.sample(n).detach().float().cpu()
    fig = plt.figure(figsize=(6, 6), dpi=100)
    if spec.image_shape is not None:
        grid = image_grid(x, spec.image_shape, nrow=int(math.ceil(math.sqrt(n))))
        if spec.support == "categorical":
            grid = grid / (spec.num_levels - 1)
        plt.imshow(grid.numpy(), cmap=grid_cmap(), vmin=0, vmax=1, interpolation="nearest")
        plt.axis("off")
    else:
        plt.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=3, alpha=0.5)
        plt.gca().set_aspect("equal")
    plt.title(f"{title or type(model).__name__}: {n} samples", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


CONDITIONS = ("top-half", "top-quarter")


def condition_mask(name: str, image_shape) -> torch.Tensor:
    """A flat boolean mask of the known pixels of one image for ``--condition-on name``."""
    if image_shape is None:
        raise DGMError("--condition-on needs image data (the dataset has no image shape)")
    h, w = image_shape[-2:]
    rows = {"top-half": h // 2, "top-quarter": h // 4}
    if name not in rows:
        raise DGMError(f"unknown condition {name!r}; choose from {', '.join(CONDITIONS)}")
    known = torch.zeros(h, w, dtype=torch.bool)
    known[: rows[name]] = True
    return known.flatten()


def save_completions(model, spec: DataSpec, x: torch.Tensor, path: Path, condition: str, per_image: int = 6) -> Path:
    """For each image of ``x``: the original, the known part, and ``per_image`` completions
    drawn from ``p(unknown | known)``, one row per image."""
    if not hasattr(model, "known_mask"):
        raise DGMError(f"{type(model).__name__} cannot complete images; use an autoregressive model")
    known = condition_mask(condition, spec.image_shape)
    flat = x.reshape(x.shape[0], -1).float()
    given = flat.repeat_interleave(per_image, 0).clone()
    given[:, ~known] = float("nan")
    with eval_mode(model), torch.no_grad():
        done = model.sample(given.shape[0], given=given.reshape((-1,) + tuple(spec.event_shape)).to(model.device))
    done = done.reshape(x.shape[0], per_image, -1).float().cpu()
    shown = torch.where(known, flat, torch.full_like(flat, 0.5))
    rows = torch.cat([flat[:, None], shown[:, None], done], 1).reshape(-1, flat.shape[1])
    if spec.support == "categorical":
        rows = rows / (spec.num_levels - 1)
    grid = image_grid(rows, spec.image_shape, nrow=per_image + 2)
    fig = plt.figure(figsize=(per_image + 2, x.shape[0] + 0.5), dpi=100)
    plt.imshow(grid.numpy(), cmap=grid_cmap(), vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    plt.title(f"{type(model).__name__}: original, known ({condition}), {per_image} completions", fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_text_samples(model, alphabet: str, path: Path, n: int = 20, temperatures=(1.0, 0.7)) -> Path:
    """Sampled strings (END-padded token data, e.g. names) at each temperature, as text."""
    from experiments.names import decode_names

    lines = []
    with eval_mode(model), torch.no_grad():
        for t in temperatures:
            g = torch.Generator(device=model.device).manual_seed(0)
            words = decode_names(model.sample(n, temperature=t, generator=g).cpu(), alphabet)
            lines.append(f"temperature {t}: " + " ".join(words))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)

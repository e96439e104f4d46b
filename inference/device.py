"""Where computations run: device names and evaluation mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from models.base import DGMError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when torch sees it, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a CUDA
    device torch cannot see is refused with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise DGMError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DGMError(
                f"--device {name}, but torch sees no CUDA device; install a CUDA build of torch or use --device cpu"
            )
        if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
            raise DGMError(f"--device {name}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@contextmanager
def eval_mode(*modules: Optional[nn.Module]):
    """Evaluate in eval mode (mask ensembles, dropout, batch norm), then restore each
    module's mode."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)

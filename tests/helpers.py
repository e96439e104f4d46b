"""Helpers shared by test modules."""

import subprocess
import sys
from pathlib import Path

import torch

from inference import ELBO, Runner, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "experiments.cli"]
TINY_EVAL = ["--no-progress", "--eval-k", "10", "--eval-limit", "10"]


def run_cli(args, **kw):
    """Run ``args`` (e.g. ``CLI + [...]``) in the repository root; the completed process."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def train_tiny_vae(run: Path) -> Path:
    """A finished run of the small VAE on digits, a few steps long, in ``run``."""
    from experiments.cli import main

    tiny = ["--data", "digits", "--preset", "small", "--epochs", "1", "--max-steps", "3", "--device", "cpu"]
    tiny += ["--eval-k", "3", "--eval-limit", "5", "--no-progress"]
    assert main(["train", "vae", *tiny, "--run-dir", str(run)]) == 0
    return run


def fit_exact(model, data, *, epochs: int = 30, lr: float = 1e-3) -> float:
    """Train ``model`` on ``data`` through the runner and return its exact test NLL, after
    checking that ``evaluate`` used the exact estimator on the whole test set, in eval mode,
    and left the model in training mode."""
    config = TrainConfig(epochs=epochs, batch_size=100, lr=lr, device="cpu", progress=False)
    runner = Runner(model, data, ELBO(1), config=config)
    runner.fit()
    result = runner.evaluate()
    assert result["estimator"] == "exact" and result["n"] == len(data.test)
    assert model.training  # evaluate restores the training mode
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result["nll"], -model.log_prob(data.test).double().mean().item())
    model.train()
    return result["nll"]

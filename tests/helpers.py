"""Helpers shared by test modules."""

import torch

from inference import ELBO, Runner, TrainConfig


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

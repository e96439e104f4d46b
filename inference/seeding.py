"""One way to seed a Python run: ``set_seed(seed)`` before building the model.

A run is reproducible when every random draw is: the model's and guide's initial weights
(drawn when they are built), the data order and dynamic binarization, and every sample the
objective and the estimators draw. ``Runner`` seeds the last two from ``TrainConfig.seed``
when it is built; the weights are drawn earlier, when the model is constructed, so seed
before that::

    from inference import Runner, TrainConfig, set_seed

    set_seed(0)                         # Python, NumPy, torch (CPU and CUDA), Pyro
    model = MyVAE(data.spec)            # the same initial weights every time
    Runner(model, data, objective, config=TrainConfig(seed=0)).fit()

``dgm train`` and ``experiments.runs.train_run`` do this themselves (the model is built
after ``torch.manual_seed(seed)``). On a GPU, bit-for-bit repeats also need
deterministic kernels (``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import pyro

from models.base import DGMError


def set_seed(seed: int) -> None:
    """Seed every random number generator a run draws from: Python's ``random``, NumPy's
    global generator and torch's (CPU and every CUDA device), through
    ``pyro.set_rng_seed``. Call it before building the model."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DGMError(f"a seed is an integer, got {seed!r}")
    pyro.set_rng_seed(seed)

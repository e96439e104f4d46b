"""Wall time of one training step of each objective, relative to ``iwae`` at the same K.

Two models, each with random binary data (batch B = 100 of 784 pixels, dataset size
N = 60,000 for the minibatch scale) and K samples per datapoint:

* ``vae``: the suite's ``VAE``, preset ``mlp-400-20`` (784-400-20 ReLU MLPs both ways, the
  reparameterized diagonal-Gaussian guide): ``iwae``, ``renyi`` (alpha 0.5), ``vimco``,
  ``stl``, ``dreg``, ``rws``;
* ``sbn``: the sigmoid belief net 200-784 (preset ``mnist-1layer``, Bernoulli latents, every
  guide gradient a score-function or wake term): ``iwae``, ``renyi``, ``vimco``, ``rws``
  (``stl`` and ``dreg`` refuse it).

Every contender has its own copy of the same initial weights and its own Adam (lr 1e-3, eps
1e-4), and takes the runner's step: ``objective.loss_terms(model.model, model.guide, x, idx,
N)``, ``zero_grad``, ``backward``, ``step``. Contenders are timed interleaved
(``benchmarks.common.interleaved``); the ratio is the median step time over ``iwae``'s.

What the ratios measure: the reductions differ by O(K B) work (VIMCO's leave-one-out table
is O(K^2 B)), negligible beside the networks; ``stl`` and ``dreg`` evaluate the guide's
density once more at the detached samples, and ``dreg`` hooks each sample's gradient;
``rws`` draws its samples without gradient, so its backward pass skips the path into the
encoder. Reported, not gated: no targets.

``python -m benchmarks --only objectives`` or ``python -m benchmarks.objectives [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pyro
import torch

from benchmarks.common import Row, format_table, interleaved, set_threads, time_rows
from benchmarks.estimator import make_data
from benchmarks.raw import build_vae
from inference.config import ObjectiveConfig
from inference.objective import make_objective
from models.base import DataSpec
from models.latent.sbn import PRESETS as SBN_PRESETS
from models.latent.sbn import SBN

MODELS = {
    "vae": ("iwae", "renyi", "vimco", "stl", "dreg", "rws"),
    "sbn": ("iwae", "renyi", "vimco", "rws"),
}


@dataclass
class ObjectivesConfig:
    k: int = 10
    batch: int = 100
    size: int = 60_000
    alpha: float = 0.5
    rounds: int = 5
    steps: int = 4
    warmup: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> "ObjectivesConfig":
        return cls(rounds=3, steps=3, warmup=1)


def build(model: str, seed: int):
    if model == "vae":
        return build_vae(seed)
    torch.manual_seed(seed)
    return SBN(DataSpec((784,), "binary"), SBN_PRESETS["mnist-1layer"])


def make_step(base, name: str, cfg: ObjectivesConfig, x: torch.Tensor) -> Callable[[], None]:
    """One runner-style training step of objective ``name`` on a private copy of ``base``."""
    model = copy.deepcopy(base)
    objective = make_objective(ObjectiveConfig(name=name, k=cfg.k, alpha=cfg.alpha))
    objective.check(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    idx = torch.arange(x.shape[0])

    def step() -> None:
        loss, _ = objective.loss_terms(model.model, model.guide, x, idx, cfg.size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run(cfg: ObjectivesConfig, log=print) -> List[Row]:
    x = make_data(cfg.batch, cfg.seed)
    rows: List[Row] = []
    for model_name, names in MODELS.items():
        base = build(model_name, cfg.seed)
        pyro.set_rng_seed(cfg.seed)
        steps: Dict[str, Callable[[], None]] = {name: make_step(base, name, cfg, x) for name in names}
        log(f"objectives / {model_name}: K = {cfg.k}, B = {cfg.batch}, {cfg.rounds} rounds of {cfg.steps} steps")
        per_round = interleaved(steps, rounds=cfg.rounds, steps=cfg.steps, warmup=cfg.warmup)
        note = f"ratio to iwae, K={cfg.k}"
        rows += time_rows(
            f"objective step ({model_name})", per_round, reference="iwae", notes={n: note for n in names if n != "iwae"}
        )
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    intra, inter = set_threads(args.threads)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads: intra-op {intra}, inter-op {inter}")
    cfg = ObjectivesConfig.quick() if args.quick else ObjectivesConfig()
    cfg.k = args.k
    print(format_table(run(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

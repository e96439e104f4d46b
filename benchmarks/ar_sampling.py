"""Cached incremental sampling against naive sampling for PixelCNN and Gated PixelCNN.

Model: each model's ``cpu`` preset on 28 x 28 binary images (the MNIST data spec), random
init (seed 0), float32, ``n`` samples per call (default 8).

Contenders, per model:

* ``naive``: ``model.sample(n, cached=False)``: the whole network over the whole image for
  each of the 784 pixels (the reference);
* ``cached``: ``model.sample(n)``: each layer evaluated only at the new pixel from per-layer
  caches of its inputs (Gated PixelCNN: the vertical stack once per completed row).

Fairness check before timing: both contenders, given generators with the same seed, must
return identical samples (they draw one uniform per pixel in the same order and invert the
same conditional; an error, not a miss, if they differ). The speed-up is ``median naive /
median cached`` of per-round times (``common.interleaved``); target >= 10x, i.e. a ratio
cached / naive <= 0.1 in the table.

    python -m benchmarks.ar_sampling [--quick] [--n 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import List, Optional

import torch

from benchmarks.common import Row, Target, format_table, interleaved, set_threads, time_rows
from models.autoregressive.gated_pixelcnn import GatedPixelCNN
from models.autoregressive.pixelcnn import PixelCNN
from models.base import DataSpec

MNIST = DataSpec((784,), "binary", image_shape=(28, 28))
TARGET = Target("<=", 0.1)  # cached / naive time, i.e. a speed-up of at least 10x


@dataclass
class SamplingConfig:
    n: int = 8  # samples per call
    preset: str = "cpu"
    rounds: int = 3
    warmup: int = 1
    check_n: int = 2  # samples of the identity check (any n shows the two paths agree)
    seed: int = 0

    @classmethod
    def quick(cls) -> "SamplingConfig":
        return cls(rounds=2, warmup=0)  # n stays 8: at n = 2 the naive path's cost is mostly fixed overhead


def check_same(model, n: int, seed: int) -> None:
    """Cached and naive sampling from the same seed give the same samples."""
    cached = model.sample(n, generator=torch.Generator().manual_seed(seed))
    naive = model.sample(n, cached=False, generator=torch.Generator().manual_seed(seed))
    if not torch.equal(cached, naive):
        diff = int((cached != naive).sum())
        raise AssertionError(f"{model.name}: cached and naive samples differ in {diff} pixels; timings void")


def run(cfg: SamplingConfig, log=print) -> List[Row]:
    log(
        f"ar_sampling: {cfg.preset} presets, 28 x 28 binary, {cfg.n} samples per call; "
        f"{cfg.rounds} rounds x 1 call per contender, warm-up {cfg.warmup}"
    )
    rows = []
    for cls in (PixelCNN, GatedPixelCNN):
        torch.manual_seed(cfg.seed)
        model = cls(MNIST, cls.presets[cfg.preset]).eval()
        check_same(model, cfg.check_n, cfg.seed)
        contenders = {
            "naive": lambda: model.sample(cfg.n, cached=False, generator=torch.Generator().manual_seed(cfg.seed)),
            "cached": lambda: model.sample(cfg.n, generator=torch.Generator().manual_seed(cfg.seed)),
        }
        per_round = interleaved(contenders, rounds=cfg.rounds, steps=1, warmup=cfg.warmup)
        speedup = statistics.median(per_round["naive"]) / statistics.median(per_round["cached"])
        label = f"sample {cls.name} n={cfg.n}"
        rows += time_rows(
            label,
            per_round,
            reference="naive",
            targets={"cached": TARGET},
            notes={"cached": f"speed-up {speedup:.1f}x, samples identical"},
        )
        log(
            f"{label}: naive {statistics.median(per_round['naive']):.2f} s, cached "
            f"{statistics.median(per_round['cached']):.3f} s per call: {speedup:.1f}x"
        )
    for row in rows:
        row.unit = "ms/call"
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="samples per call")
    args = p.parse_args(argv)
    set_threads(args.threads)
    cfg = SamplingConfig.quick() if args.quick else SamplingConfig()
    if args.n is not None:
        cfg.n = args.n
    print(format_table(run(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput and memory of the importance-sampling estimator of log p(x).

Model: the suite's ``VAE`` (``mlp-400-20``, random init), B test points of random binary
data, K = 5,000 samples per datapoint, the encoder as proposal.

Contenders (timed interleaved, one estimate of the B points per block):

* ``raw``: ``benchmarks.raw.raw_importance``, a vectorized torch estimator of the same
  quantity, ``logsumexp_k log w_k - log K``, chunked exactly as ours (``max_rows // B``
  samples per chunk) and combined with ``logaddexp``.
* ``ours``: ``inference.estimators.importance`` with its defaults (chunking, the Pareto
  k-hat fit, ESS and standard error included; these are part of what it costs).
* ``pyro``: ``pyro.infer.Importance(model, guide, num_samples=S).run(x_i)`` and
  ``get_log_normalizer()``, one datapoint at a time (its log-weight sums the whole batch,
  so per-datapoint values need batches of one), on ``pyro_points`` datapoints with S much
  smaller than K; its datapoints/second are scaled to K = 5,000 (cost is linear in S).

Before timing, ``ours`` and ``raw`` are run from the same seed: they draw the same noise
(``normal_`` of shape ``[chunk, B, L]`` per chunk, in the same order), so their estimates
must agree to float64 rounding, and the check asserts they do.

Memory: ``ours`` at K = 5,000 and K = 50,000, each in a fresh subprocess (so peaks do not
mix), reported as the increase of peak RSS (``ru_maxrss``) over the RSS just before the
estimate (after imports, model build and a warm-up estimate with K = 10). B = 8 there,
so the default chunk (``32768 // 8 = 4096`` samples) is smaller than both K and the two
runs hold the same chunk in memory; the claim under test is that memory does not grow
with K. (A child's ``ru_maxrss`` starts at its launcher's peak, so the children run
before this process grows; ``memory_child`` falls back to ``VmHWM`` if that fails.)

``python -m benchmarks.estimator --profile`` runs cProfile on one estimate of ours and of
raw and prints the top functions in ms per chunk.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
from dataclasses import dataclass
from typing import List, Optional

import pyro
import pyro.infer
import torch
from torch import Tensor

from benchmarks.common import (
    Row,
    Target,
    format_table,
    interleaved,
    peak_rss,
    print_profile,
    run_memory_child,
    set_threads,
)
from benchmarks.raw import build_vae, raw_importance
from inference.estimators import importance
from models.latent.vae import VAE

MAX_ROWS = 1 << 15  # inference.estimators.importance's default max_rows
TARGET_THROUGHPUT = 0.9  # ours / raw datapoints per second, at least
TARGET_MEMORY = 1.2  # peak-RSS increase at K = 50,000 over K = 5,000, at most


@dataclass
class EstimatorConfig:
    batch: int = 100
    k: int = 5_000
    rounds: int = 4
    check_k: int = 1_000  # the same-seed check (it also warms both code paths up)
    pyro_points: int = 2
    pyro_samples: int = 100
    memory_batch: int = 8
    memory_ks: tuple = (5_000, 50_000)
    seed: int = 0

    @classmethod
    def quick(cls) -> "EstimatorConfig":
        # memory: K = 20,000 is still 5 chunks of 4,096 samples, against 1 at K = 5,000
        return cls(batch=20, rounds=3, pyro_points=1, pyro_samples=50, memory_ks=(5_000, 20_000))


def make_data(batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return (torch.rand(batch, 784, generator=g) < 0.5).float()


def default_chunk(k: int, batch: int) -> int:
    """The chunk ``importance`` picks with its defaults."""
    return max(1, min(k, MAX_ROWS // max(batch, 1)))


def pyro_importance(model: VAE, x: Tensor, num_samples: int) -> Tensor:
    """Pyro's estimate of log p(x_i) per datapoint: ``Importance`` on a batch of one."""
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            posterior = pyro.infer.Importance(model.model, model.guide, num_samples=num_samples)
            posterior.run(x[i : i + 1])
            out.append(posterior.get_log_normalizer())
    return torch.stack(out).double()


def check_same(model: VAE, x: Tensor, k: int, seed: int) -> str:
    torch.manual_seed(seed)
    ours = importance(model.model, model.guide, x, num_samples=k).log_px
    torch.manual_seed(seed)
    raw = raw_importance(model, x, k, default_chunk(k, x.shape[0]))
    diff = (ours - raw).abs().max().item()
    if not torch.allclose(ours, raw, rtol=1e-7, atol=1e-6):
        raise AssertionError(f"ours and raw log p(x) differ by up to {diff:.3g} nats from the same seed")
    return (
        f"is: same seed (shared random stream) -> ours and raw log p(x) agree to {diff:.1e} nats "
        f"(mean log p(x) {ours.mean().item():.3f}, K = {k})"
    )


def bench_throughput(cfg: EstimatorConfig, log) -> List[Row]:
    model = build_vae(cfg.seed)
    x = make_data(cfg.batch, cfg.seed)
    chunk = default_chunk(cfg.k, cfg.batch)
    log(
        f"estimator: B = {cfg.batch}, K = {cfg.k}, chunk = {chunk} samples ({chunk * cfg.batch} rows), "
        f"{cfg.rounds} rounds; pyro: {cfg.pyro_points} points x {cfg.pyro_samples} samples, scaled to K"
    )
    log(check_same(model, x, cfg.check_k, cfg.seed + 7))
    xp = x[: cfg.pyro_points]
    torch.manual_seed(cfg.seed + 8)
    pyro_lp = pyro_importance(model, xp, cfg.pyro_samples)
    torch.manual_seed(cfg.seed + 8)
    ours_lp = importance(model.model, model.guide, xp, num_samples=cfg.k).log_px
    log(
        f"is: pyro (S = {cfg.pyro_samples}) log p(x) {[round(v, 2) for v in pyro_lp.tolist()]} vs ours "
        f"(K = {cfg.k}) {[round(v, 2) for v in ours_lp.tolist()]} (different K: agree within MC error only)"
    )
    contenders = {
        "raw": lambda: raw_importance(model, x, cfg.k, chunk),
        "ours": lambda: importance(model.model, model.guide, x, num_samples=cfg.k),
        "pyro": lambda: pyro_importance(model, xp, cfg.pyro_samples),
    }
    # no separate warm-up: the checks just above ran every contender's code path
    t = interleaved(contenders, rounds=cfg.rounds, steps=1, warmup=0)
    # datapoints per second at K: B / seconds per estimate (pyro: scaled from S to K)
    work = {"raw": cfg.batch, "ours": cfg.batch, "pyro": cfg.pyro_points * cfg.pyro_samples / cfg.k}
    rates = {name: [work[name] / s for s in times] for name, times in t.items()}
    med = {name: _median(r) for name, r in rates.items()}
    rows = []
    for name in ("raw", "ours", "pyro"):
        paired = [a / b for a, b in zip(rates[name], rates["raw"])]
        rows.append(
            Row(
                f"IS log p(x) K={cfg.k} B={cfg.batch}",
                name,
                med[name],
                "points/s",
                ratio=med[name] / med["raw"],
                spread=(min(paired), max(paired)) if name != "raw" else None,
                target=Target(">=", TARGET_THROUGHPUT) if name == "ours" else None,
                note={
                    "ours": "throughput ratio, higher is better",
                    "pyro": f"reference: Importance, {cfg.pyro_samples} samples, scaled to K={cfg.k}",
                }.get(name, ""),
            )
        )
    return rows


def _median(v: List[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --- memory ---------------------------------------------------------------------------------


def memory_child(k: int, batch: int, seed: int) -> dict:
    """Run in a fresh process: the peak-RSS increase of one ``importance`` call
    (``benchmarks.common.peak_rss``: ``ru_maxrss``, or ``VmHWM`` where the launcher's peak
    hides it)."""
    model = build_vae(seed)
    x = make_data(batch, seed)
    importance(model.model, model.guide, x, num_samples=10)  # warm-up: lazy inits, allocator
    measured = peak_rss(lambda: importance(model.model, model.guide, x, num_samples=k))
    return {"k": k, "batch": batch, "chunk": default_chunk(k, batch), **measured}


def bench_memory(cfg: EstimatorConfig, threads: int, log) -> List[Row]:
    results = []
    for k in cfg.memory_ks:
        args = ["--batch", cfg.memory_batch, "--threads", threads, "--seed", cfg.seed]
        r = run_memory_child("benchmarks.estimator", k, args)
        hwm = f", VmHWM {r['vmhwm_kib'] / 1024:.1f} MiB" if r["vmhwm_kib"] else ""
        log(
            f"memory K={k}: B = {r['batch']}, chunk {r['chunk']}, RSS before {r['rss_before_kib'] / 1024:.1f} MiB, "
            f"ru_maxrss {r['ru_maxrss_before_kib'] / 1024:.1f} -> {r['ru_maxrss_kib'] / 1024:.1f} MiB{hwm}; "
            f"increase {r['increase_kib'] / 1024:.1f} MiB from {r['source']}"
        )
        results.append(r)
    lo, hi = results[0], results[-1]
    ratio = hi["increase_kib"] / max(lo["increase_kib"], 1)
    bench = f"IS peak-RSS increase (B={cfg.memory_batch})"
    rows = [
        Row(bench, f"ours K={r['k']}", r["increase_kib"] / 1024, "MiB", note=f"peak RSS {r['peak_kib'] / 1024:.0f} MiB")
        for r in results
    ]
    rows[-1].ratio = ratio
    rows[-1].target = Target("<=", TARGET_MEMORY)
    rows[-1].note += f"; ratio = increase at K={hi['k']} / K={lo['k']}"
    return rows


def profile(cfg: EstimatorConfig, top: int = 25) -> None:
    """cProfile one estimate (B points, K samples) of ours and of raw; ms per chunk."""
    model = build_vae(cfg.seed)
    x = make_data(cfg.batch, cfg.seed)
    chunk = default_chunk(cfg.k, cfg.batch)
    chunks = math.ceil(cfg.k / chunk)
    for name, fn in (
        ("ours", lambda k: importance(model.model, model.guide, x, num_samples=k)),
        ("raw", lambda k: raw_importance(model, x, k, chunk)),
    ):
        fn(2 * chunk)  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        fn(cfg.k)
        prof.disable()
        print_profile(pstats.Stats(prof), chunks, "chunk", f"IS {name}, B = {cfg.batch}, K = {cfg.k}", top)


def run(cfg: EstimatorConfig, threads: int, log=print) -> List[Row]:
    # memory first: the children's ru_maxrss starts at this process's peak (see memory_child)
    mem = bench_memory(cfg, threads, log)
    return bench_throughput(cfg, log) + mem


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile one estimate of ours and of raw")
    p.add_argument("--memory-child", type=int, default=None, metavar="K", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    intra, inter = set_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.batch, args.seed)))
        return 0
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads: intra-op {intra}, inter-op {inter}")
    cfg = EstimatorConfig.quick() if args.quick else EstimatorConfig()
    cfg.seed = args.seed
    if args.profile:
        profile(cfg)
        return 0
    print(format_table(run(cfg, intra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

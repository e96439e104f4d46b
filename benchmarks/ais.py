"""Throughput and memory of the AIS estimator of log p(x) (``inference.ais``).

Model: the suite's ``VAE`` (``mlp-400-20``, random init), B points of random binary data,
AIS from the prior with the sigmoid schedule, T distributions, C chains per datapoint, HMC
with L leapfrog steps and the adaptive step size (start 0.01, x1.02 / x0.98 toward 65%
acceptance).

Contenders (timed interleaved, one estimate of the B points per block):

* ``raw``: ``benchmarks.raw.raw_ais``, the same AIS + HMC written in torch alone: the
  decoder and the Bernoulli log-likelihood by hand, the prior's gradient ``-z`` in closed
  form, autograd for the likelihood's.
* ``raw-autograd-prior``: the same loop with the prior's gradient taken by autograd
  (``raw_ais(..., autograd_prior=True)``), as any target built from a program must take it:
  the same numbers, a few more ``[C, B, L]`` temporaries per evaluation. No target; it is
  there to show the allocator's share (below).
* ``ours``: the registered ``ais`` estimator (``make_estimator(EvalConfig(estimator="ais",
  ...))``), which builds its target from the Pyro program: one conditioned model trace
  under a particle plate per leapfrog step.

Allocator: the contenders are timed twice, each time with the minor page faults of every
estimate counted. First with malloc as the platform sets it. glibc's trim threshold is then
dynamic: twice the largest mapped block freed so far, ~10 MB for the 5 MB ``[C, B, 784]``
tensors here. Every ``free`` of a chunk of 64 KiB or more consolidates the free lists and
hands the top of the heap back to the kernel once that much of it is free; the next
evaluation faults its large tensors in again, one page fault per 4 KiB. How often that
happens depends on where the small and medium allocations of the moment sit, not on the
arithmetic. ``python -m benchmarks.heap_trims`` counts the trims under ``strace`` (T = 10,
B = 100, three estimates per contender; two runs on 2026-12-07): raw 10.3 and 10.0 trims an
estimate (115 MiB handed back), raw-autograd-prior 38.0 and 18.0, ours 31.3 and 42.7 (394 and
546 MiB); pinned, none.

Taking only the prior's gradient by autograd (``raw-autograd-prior``) is enough to make raw
trim 1.8-3.8 times as often and fault 2.0-2.9 times as often (four full runs on 2026-12-07;
e.g. 91,516 faults an estimate against raw's 44,886, ours 177,466). With malloc as it is, ours
ran at 0.773-0.856 of raw (raw-autograd-prior 0.887-0.946); pinned, none of the three faulted
after warm-up, and ours ran at 0.885-1.003, median 0.961 (raw-autograd-prior 0.987-1.018).
So with glibc's defaults the ratio measures how the allocator reacts to a generic target's
allocations more than the work done, and the target sits on the rounds with glibc's malloc
pinned (``benchmarks.common.pin_malloc``: freed memory stays in the heap), where the ratio
measures the programs' work. ``--malloc default``
(``python -m benchmarks.ais``), or a platform where malloc cannot be pinned, times only the
first set, and that row carries the target.

Fairness check, before timing: all three are run from the same seed on a float64 copy of
the model and data. They draw the same random numbers in the same order (``z_0``, then per
transition the momenta and the uniforms), so they must give the same log p(x) to float64
rounding (asserted; 0 to 1e-13 nats here); in float32 the orders of summation differ and
the difference is reported (~1e-5 nats), not asserted.

Memory: ``ours`` at T = 100 and T = 10,000, each in a fresh subprocess, with L = 1 and a
small batch (B = 8, C = 8; ~2.5 ms a transition, so T = 10,000 takes ~30 s). Reported: the
peak RSS of the child (``ru_maxrss``, or ``VmHWM`` reset just before the estimate when
``ru_maxrss`` still holds the launcher's peak, as in ``benchmarks.estimator``) and its
increase over the RSS just before the estimate (after imports, model build and a T = 10
warm-up). The target is on the ratio of the peaks; the increases are ~1 MiB or less at
both T, too small for a ratio. Sensitivity: keeping one chain state ``[C, B, L]`` per step
would add ``C B L 4 T`` bytes, 49 MiB at T = 10,000, which the 1.1x target would catch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pyro
import torch
from torch import Tensor

from benchmarks.common import (
    PageFaults,
    Row,
    Target,
    format_table,
    interleaved,
    peak_rss,
    pin_malloc,
    run_memory_child,
    set_threads,
)
from benchmarks.estimator import make_data
from benchmarks.raw import build_vae, raw_ais
from inference.config import EvalConfig
from inference.estimators import make_estimator

TARGET_THROUGHPUT = 0.9  # ours / raw datapoints per second, at least
TARGET_MEMORY = 1.1  # peak RSS at T = 10,000 over T = 100, at most


@dataclass
class AISConfig:
    batch: int = 100  # dgm eval's batch, C and L: its defaults; a short T (the cost per transition is T-free)
    steps: int = 10
    chains: int = 16
    leapfrog: int = 10
    rounds: int = 10  # per allocator; short blocks, many rounds: a shared machine drifts +-10% between blocks
    pin_malloc: bool = True  # the second set of rounds (benchmarks.common.pin_malloc); --malloc default: none
    check_batch: int = 10  # the float64 same-stream check
    check_steps: int = 20
    memory_batch: int = 8
    memory_chains: int = 8
    memory_steps: tuple = (100, 10_000)
    seed: int = 0

    @classmethod
    def quick(cls) -> "AISConfig":
        return cls(steps=5, rounds=5, check_batch=5, check_steps=10)  # the same transitions, fewer of them


def ours_estimator(model, steps: int, chains: int, leapfrog: int):
    """``x -> log p(x)`` of the registered ``ais`` estimator (prior start, sigmoid schedule)."""
    config = EvalConfig(estimator="ais", steps=steps, chains=chains, leapfrog=leapfrog)
    est = make_estimator(config, model)
    est.progress = False
    return lambda x: est.estimate(model, x).log_px


def contenders_for(model, steps: int, chains: int, leapfrog: int) -> Dict[str, Callable[[Tensor], Tensor]]:
    """``name -> (x -> log p(x))``, the reference ``raw`` first."""
    ours = ours_estimator(model, steps, chains, leapfrog)
    return {
        "raw": lambda x: raw_ais(model, x, steps, chains, leapfrog),
        "raw-autograd-prior": lambda x: raw_ais(model, x, steps, chains, leapfrog, autograd_prior=True),
        "ours": ours,
    }


def same_seed(fns: Dict[str, Callable[[Tensor], Tensor]], x: Tensor, seed: int) -> Dict[str, Tensor]:
    """Each contender's log p(x), every one from the same seed."""
    out = {}
    for name, fn in fns.items():
        torch.manual_seed(seed)
        out[name] = fn(x)
    return out


def check_same(cfg: AISConfig, log) -> None:
    """Same seed, float64: every contender must give raw's log p(x) to rounding."""
    model = build_vae(cfg.seed).double()
    x = make_data(cfg.check_batch, cfg.seed).double()
    est = same_seed(contenders_for(model, cfg.check_steps, cfg.chains, cfg.leapfrog), x, cfg.seed + 7)
    diffs = {name: (v - est["raw"]).abs().max().item() for name, v in est.items() if name != "raw"}
    for name, diff in diffs.items():
        if not torch.allclose(est[name], est["raw"], rtol=0, atol=1e-9):
            raise AssertionError(f"{name} and raw AIS log p(x) differ by up to {diff:.3g} nats from the same seed")
    log(
        "ais: same seed, float64 (shared random stream) -> log p(x) agrees with raw's to "
        + ", ".join(f"{d:.1e} nats ({n})" for n, d in diffs.items())
        + f" (B = {cfg.check_batch}, T = {cfg.check_steps}, C = {cfg.chains}, L = {cfg.leapfrog}, "
        f"mean log p(x) {est['raw'].mean().item():.3f})"
    )


def bench_throughput(cfg: AISConfig, log) -> List[Row]:
    check_same(cfg, log)
    model = build_vae(cfg.seed)
    x = make_data(cfg.batch, cfg.seed)
    fns = contenders_for(model, cfg.steps, cfg.chains, cfg.leapfrog)
    est = same_seed(fns, x, cfg.seed + 8)  # also the warm-up
    log(
        f"ais: B = {cfg.batch}, T = {cfg.steps}, C = {cfg.chains}, L = {cfg.leapfrog}, {cfg.rounds} rounds per "
        f"allocator; float32, same seed: ours and raw differ by up to "
        f"{(est['ours'] - est['raw']).abs().max().item():.1e} nats "
        f"(summation order; mean log p(x) {est['ours'].mean().item():.3f})"
    )
    contenders = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    rows = _timed(cfg, contenders, "malloc default", log)  # first: pinning cannot be undone
    pinned = pin_malloc() if cfg.pin_malloc else None
    if pinned:
        log(f"ais: {pinned}")
        rows += _timed(cfg, contenders, "malloc pinned", log)
    else:
        log("ais: no pinned rounds (--malloc default, or not glibc): the target applies to malloc as it is")
    # the target: on ours' row of the last set timed (pinned where it ran)
    next(r for r in reversed(rows) if r.contender == "ours").target = Target(">=", TARGET_THROUGHPUT)
    return rows


def _timed(cfg: AISConfig, contenders: dict, allocator: str, log) -> List[Row]:
    """``cfg.rounds`` interleaved rounds of the contenders, as rows (points/s) labelled with ``allocator``."""
    faults = PageFaults(contenders)
    t = interleaved(faults.wrapped, rounds=cfg.rounds, steps=1, warmup=0)  # the same-seed run warmed every contender up
    log(
        f"ais, {allocator}: minor page faults per estimate: "
        + ", ".join(f"{n} {faults.per_call(n):,.0f}" for n in contenders)
    )
    rates = {name: [cfg.batch / s for s in times] for name, times in t.items()}
    med = {name: _median(r) for name, r in rates.items()}
    rows = []
    for name in contenders:
        paired = [a / b for a, b in zip(rates[name], rates["raw"])]
        note = f"{faults.per_call(name):,.0f} page faults per estimate"
        if name != "raw":
            note = f"throughput ratio, higher is better; {note}"
        rows.append(
            Row(
                f"AIS log p(x) T={cfg.steps} C={cfg.chains} L={cfg.leapfrog} B={cfg.batch}, {allocator}",
                name,
                med[name],
                "points/s",
                ratio=med[name] / med["raw"],
                spread=(min(paired), max(paired)) if name != "raw" else None,
                note=note,
            )
        )
    return rows


def _median(v: List[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --- memory ---------------------------------------------------------------------------------
def memory_child(steps: int, batch: int, chains: int, seed: int) -> dict:
    """Run in a fresh process: peak RSS and its increase over one ``ais`` estimate with
    ``L = 1`` (see ``benchmarks.common.peak_rss`` for the ``ru_maxrss`` caveat)."""
    model = build_vae(seed)
    x = make_data(batch, seed)
    ours_estimator(model, 10, chains, 1)(x)  # warm-up: lazy inits, allocator
    ours = ours_estimator(model, steps, chains, 1)
    return {"steps": steps, "batch": batch, "chains": chains, **peak_rss(lambda: ours(x))}


def bench_memory(cfg: AISConfig, threads: int, log) -> List[Row]:
    results = []
    for steps in cfg.memory_steps:
        args = ["--batch", cfg.memory_batch, "--chains", cfg.memory_chains, "--threads", threads, "--seed", cfg.seed]
        r = run_memory_child("benchmarks.ais", steps, args)
        log(
            f"memory T={steps}: B = {r['batch']}, C = {r['chains']}, L = 1, RSS before "
            f"{r['rss_before_kib'] / 1024:.1f} MiB, peak {r['peak_kib'] / 1024:.1f} MiB ({r['source']}), "
            f"increase {r['increase_kib'] / 1024:.2f} MiB"
        )
        results.append(r)
    lo, hi = results[0], results[-1]
    bench = f"AIS peak RSS (B={cfg.memory_batch}, C={cfg.memory_chains}, L=1)"
    rows = [
        Row(bench, f"ours T={r['steps']}", r["peak_kib"] / 1024, "MiB", note=f"+{r['increase_kib'] / 1024:.2f} MiB")
        for r in results
    ]
    rows[-1].ratio = hi["peak_kib"] / lo["peak_kib"]
    rows[-1].target = Target("<=", TARGET_MEMORY)
    rows[-1].note += f" over the RSS before; ratio = peak at T={hi['steps']} / T={lo['steps']}"
    rows[0].note += " over the RSS before the estimate"
    return rows


def run(cfg: AISConfig, threads: int, log=print) -> List[Row]:
    # memory first: the children's ru_maxrss starts at this process's peak (see memory_child)
    mem = bench_memory(cfg, threads, log)
    return bench_throughput(cfg, log) + mem


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="pinned (default): after the rounds with malloc as it is, more rounds with glibc's malloc pinned "
        "(benchmarks.common.pin_malloc), which carry the target; default: only the former, which then carry it",
    )
    p.add_argument("--memory-child", type=int, default=None, metavar="T", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--chains", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    intra, inter = set_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.batch, args.chains, args.seed)))
        return 0
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads: intra-op {intra}, inter-op {inter}")
    cfg = AISConfig.quick() if args.quick else AISConfig()
    cfg.seed = args.seed
    cfg.pin_malloc = args.malloc == "pinned"
    print(format_table(run(cfg, intra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Interleaved timing and the results table shared by every benchmark.

Why interleaved: on a shared or loaded machine the speed of the CPU drifts over seconds
(other jobs, frequency scaling, caches). Timing contender A for a minute and then B for a
minute puts that drift into the ratio. Here every contender runs one block of ``steps``
calls in turn, every other round in reverse order (A, B, C, C, B, A, ... for ``rounds``
rounds, after a warm-up), so each round's blocks see nearly the same machine and no
contender always runs right after the same other one (whose leftover cache and heap state it
would inherit). The reported ratio is the ratio of the per-round medians, with the min-max of
the paired per-round ratios as its spread.

Garbage: ``gc.collect()`` runs before every block, outside the timer, so that one
contender's leftover cyclic garbage is not collected on another's clock; the automatic
collector stays on inside the block, as it is in a training loop.
"""

from __future__ import annotations

import gc
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

DEFAULT_THREADS = 1
"""One intra-op thread by default: on a 2-core machine shared with another job, two
OpenMP threads stall at every op's barrier whenever one is descheduled (measured here:
ELBO steps 3-4x slower, Pyro's SVI step ~50x slower than with one thread). Pass
``--threads`` on an idle machine."""


def set_threads(threads: Optional[int] = None) -> Tuple[int, int]:
    """Fix torch's intra-op threads (default ``DEFAULT_THREADS``); return ``(intra, inter)``."""
    torch.set_num_threads(threads or DEFAULT_THREADS)
    return torch.get_num_threads(), torch.get_num_interop_threads()


def interleaved(
    contenders: Dict[str, Callable[[], object]],
    *,
    rounds: int,
    steps: Union[int, Dict[str, int]],
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Time ``contenders`` round-robin; return each one's per-round mean seconds per call.

    Even rounds run the contenders in the dict's order, odd rounds in reverse (see the module
    docstring). ``steps`` is the number of calls per block, or a dict of them per contender (a slow
    reference may get fewer calls per block; its time is still per call). ``clock`` is wall
    time by default; ``time.process_time`` gives this process's CPU time (user + system).
    """
    steps = steps if isinstance(steps, dict) else {name: steps for name in contenders}
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    out: Dict[str, List[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            fn = contenders[name]
            gc.collect()
            n = steps[name]
            t0 = clock()
            for _ in range(n):
                fn()
            out[name].append((clock() - t0) / n)
    return out


class PageFaults:
    """Minor page faults of this process, attributed to whichever contender ran:
    ``wrapped`` holds the contenders, each counting its faults (``getrusage``) per call."""

    def __init__(self, contenders: Dict[str, Callable[[], object]]):
        self.faults = {name: 0 for name in contenders}
        self.calls = {name: 0 for name in contenders}
        self.wrapped = {name: self._wrap(name, fn) for name, fn in contenders.items()}

    def _wrap(self, name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def call():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            self.faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            self.calls[name] += 1

        return call

    def per_call(self, name: str) -> float:
        return self.faults[name] / max(self.calls[name], 1)


PINNED_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold: larger blocks still unmap
PINNED_TRIM_THRESHOLD = 256 << 20  # at most this much freed memory is kept at the top of the heap


def pin_malloc() -> Optional[str]:
    """Stop glibc's malloc from handing freed memory back to the kernel after every few calls:
    ``M_MMAP_THRESHOLD`` fixed at 32 MiB (the ceiling of glibc's dynamic threshold, so larger
    blocks are still mapped and unmapped on their own) and ``M_TRIM_THRESHOLD`` at 256 MiB
    (``mallopt``; ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`` in the
    environment do the same for any program). With glibc's dynamic defaults the trim threshold
    is twice the largest mapped block freed so far (~10 MB for 5 MB tensors), so the heap's top goes
    back to the kernel whenever a call's frees leave that much free there, and the next call
    pays a page fault for every 4 KiB of its tensors again: in the AIS benchmark up to 254,000
    faults (~1 GB) in one round, 0.3-0.5 s on a 2.6 s block; pinned, under 1,000 per estimate.
    Twelve 64 MiB tensors allocated and freed in turn leave the same RSS pinned as not
    (221 MiB). Process-wide and not undone: call it only in a process that times nothing else
    afterwards. Returns what was set, or None where this is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not (mallopt(m_mmap_threshold, PINNED_MMAP_THRESHOLD) and mallopt(m_trim_threshold, PINNED_TRIM_THRESHOLD)):
        return None
    return (
        f"glibc malloc pinned: M_MMAP_THRESHOLD {PINNED_MMAP_THRESHOLD >> 20} MiB, "
        f"M_TRIM_THRESHOLD {PINNED_TRIM_THRESHOLD >> 20} MiB"
    )


@dataclass(frozen=True)
class Target:
    """``ratio <op> bound``, e.g. ``Target("<=", 1.15)``."""

    op: str
    bound: float

    def ok(self, ratio: float) -> bool:
        return ratio <= self.bound if self.op == "<=" else ratio >= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    contender: str
    value: float  # in ``unit``
    unit: str
    ratio: Optional[float] = None  # to the reference (raw torch) contender
    spread: Optional[Tuple[float, float]] = None  # min-max of the per-round ratios
    target: Optional[Target] = None
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "PASS" if self.target.ok(self.ratio) else "MISS"


def time_rows(
    benchmark: str,
    per_round: Dict[str, List[float]],
    *,
    reference: str = "raw",
    targets: Optional[Dict[str, Target]] = None,
    notes: Optional[Dict[str, str]] = None,
) -> List[Row]:
    """Rows of median ms per call and ``ratio = median(c) / median(reference)``."""
    targets, notes = targets or {}, notes or {}
    ref = per_round[reference]
    ref_med = statistics.median(ref)
    rows = []
    for name, times in per_round.items():
        med = statistics.median(times)
        row = Row(benchmark, name, med * 1e3, "ms/step", note=notes.get(name, ""))
        if name != reference:
            paired = [t / r for t, r in zip(times, ref)]
            row.ratio = med / ref_med
            row.spread = (min(paired), max(paired))
            row.target = targets.get(name)
        else:
            row.ratio = 1.0
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ("benchmark", "contender", "median", "unit", "ratio to raw", "per-round ratio min-max", "target", "result")
    lines = []
    for r in rows:
        spread = f"{r.spread[0]:.3f}-{r.spread[1]:.3f}" if r.spread else ""
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else ""
        result = r.status
        if r.note:
            result = f"{result} ({r.note})" if result else f"({r.note})"
        lines.append((r.benchmark, r.contender, _fmt(r.value), r.unit, ratio, spread, str(r.target or ""), result))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    sep = "-+-".join("-" * w for w in widths)

    def fmt(cells):
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([fmt(header), sep, *(fmt(line) for line in lines)])


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def misses(rows: Sequence[Row]) -> List[Row]:
    return [r for r in rows if r.status == "MISS"]


def banner(text: str) -> str:
    bar = "!" * (len(text) + 8)
    return f"{bar}\n!!! {text} !!!\n{bar}"


def print_profile(stats: pstats.Stats, calls: int, unit: str, title: str, top: int = 25) -> None:
    """The ``top`` functions of a cProfile run by self time and by cumulative time, in ms
    per ``unit`` (``calls`` units were profiled)."""
    rows = []
    for (file, line, func), (_, nc, tt, ct, _) in stats.stats.items():
        where = file.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append((tt, ct, nc, f"{where}:{line}({func})"))
    print(f"\n=== {title}: {stats.total_tt / calls * 1e3:.3f} ms/{unit} under cProfile ({calls} {unit}s) ===")
    head = f"{'self ms/' + unit:>16} {'cum ms/' + unit:>16} {'calls/' + unit:>12}  function"
    for label, key in (("by self time", lambda r: -r[0]), ("by cumulative time", lambda r: -r[1])):
        print(f"-- {label} --\n{head}")
        for tt, ct, nc, name in sorted(rows, key=key)[:top]:
            print(f"{tt / calls * 1e3:16.3f} {ct / calls * 1e3:16.3f} {nc / calls:12.1f}  {name}")


# --- peak memory of one call, in a fresh process -------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(call) -> dict:
    """Run ``call()`` and return this process's RSS just before it and its peak during it
    (KiB), with the source of the peak. Primary measure: ``ru_maxrss`` after the call. Caveat:
    Linux folds the launching process's peak RSS into a child's ``ru_maxrss`` at ``exec``, so
    if the launcher's peak is above the call's, ``ru_maxrss`` does not move; then the mm's
    own high-water mark (``VmHWM``, reset just before the call) is used and the source says so."""
    gc.collect()
    before = _status_kib("VmRSS")
    hwm_reset = _reset_hwm()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _status_kib("VmHWM")
    if maxrss > peak_before:
        peak, source = maxrss, "ru_maxrss"
    elif hwm_reset:
        peak, source = hwm, "VmHWM (ru_maxrss held the launcher's peak)"
    else:
        peak, source = maxrss, "ru_maxrss (did not move: a lower bound)"
    return {
        "rss_before_kib": before,
        "ru_maxrss_before_kib": peak_before,
        "ru_maxrss_kib": maxrss,
        "vmhwm_kib": hwm if hwm_reset else None,
        "peak_kib": peak,
        "increase_kib": peak - before,
        "source": source,
    }


REPO = Path(__file__).resolve().parent.parent


def run_memory_child(module: str, size: int, args: Sequence[str]) -> dict:
    """Run ``python -m module --memory-child size *args`` in a fresh process (so its peak RSS
    holds none of this process's allocations) and return the JSON its last line prints."""
    cmd = [sys.executable, "-m", module, "--memory-child", str(size), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {module} {size} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

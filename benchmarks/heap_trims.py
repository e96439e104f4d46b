"""How often glibc hands the top of the heap back to the kernel during AIS estimates: the cause
of the page faults that ``python -m benchmarks --only ais`` counts with malloc as it is.

Each contender of ``benchmarks.ais`` (``raw``, ``raw-autograd-prior``, ``ours``) runs in its own
child process under ``strace -e trace=brk,getppid``: one warm-up estimate, then ``--estimates``
estimates between two ``getppid`` calls that mark the measured stretch. A ``brk`` that returns a
lower break than the one before is a heap trim; the report gives trims and MiB handed back per
estimate, and the child's minor page faults per estimate (``getrusage``). ``--pinned``
pins glibc's malloc first (``benchmarks.common.pin_malloc``), where no trim is expected.

Linux with glibc and ``strace`` (Debian: ``apt install strace``) only. Not part of any target:
a diagnostic, run by hand (``python -m benchmarks.heap_trims``; ~1 minute).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

from benchmarks.common import REPO

CONTENDERS = ("raw", "raw-autograd-prior", "ours")
BRK = re.compile(r"^brk\((?:NULL|0x[0-9a-f]+)\)\s*=\s*(0x[0-9a-f]+)")


def count_trims(lines: List[str]) -> Dict[str, float]:
    """Heap trims (a ``brk`` result below the previous one) and the bytes they hand back, in the
    stretch between the first two ``getppid`` lines of an ``strace`` log."""
    marks = [i for i, line in enumerate(lines) if line.startswith("getppid(")]
    if len(marks) < 2:
        raise RuntimeError("the strace log lacks the two getppid markers around the measured estimates")
    last, trims, handed = None, 0, 0
    for i, line in enumerate(lines[: marks[1]]):
        m = BRK.match(line)
        if not m:
            continue
        brk = int(m.group(1), 16)
        if last is not None and brk < last and i > marks[0]:
            trims += 1
            handed += last - brk
        last = brk
    return {"trims": trims, "handed_back": handed}


def child(name: str, estimates: int, steps: int, pinned: bool) -> None:
    """Run in the traced process: warm up, then ``estimates`` estimates between the markers."""
    import resource

    import torch

    from benchmarks.ais import contenders_for
    from benchmarks.common import pin_malloc, set_threads
    from benchmarks.estimator import make_data
    from benchmarks.raw import build_vae

    set_threads(1)
    if pinned and pin_malloc() is None:
        raise SystemExit("malloc cannot be pinned here (not glibc)")
    model, x = build_vae(0), make_data(100, 0)
    fn = contenders_for(model, steps, 16, 10)[name]
    torch.manual_seed(0)
    fn(x)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    os.getppid()
    for _ in range(estimates):
        fn(x)
    os.getppid()
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))


def trace(name: str, estimates: int, steps: int, pinned: bool) -> Dict[str, float]:
    """``child`` of ``name`` under strace: trims, MiB handed back and page faults per estimate."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "strace.log")
        cmd = ["strace", "-e", "trace=brk,getppid", "-o", log, sys.executable, "-m", "benchmarks.heap_trims"]
        cmd += ["--child", name, "--estimates", str(estimates), "--steps", str(steps)] + ["--pinned"] * pinned
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the traced child for {name} failed:\n{out.stderr[-2000:]}")
        with open(log) as f:
            counts = count_trims(f.read().splitlines())
    faults = json.loads(out.stdout.strip().splitlines()[-1])["faults"]
    return {
        "trims": counts["trims"] / estimates,
        "mib_handed_back": counts["handed_back"] / estimates / 2**20,
        "faults": faults / estimates,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--estimates", type=int, default=3, help="measured estimates per contender (default 3)")
    p.add_argument("--steps", type=int, default=10, help="AIS distributions T (default 10; B = 100, C = 16, L = 10)")
    p.add_argument("--pinned", action="store_true", help="pin glibc's malloc in the children first")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.estimates, args.steps, args.pinned)
        return 0
    if shutil.which("strace") is None:
        print("heap_trims needs strace (Debian/Ubuntu: apt install strace)", file=sys.stderr)
        return 2
    malloc = "pinned" if args.pinned else "as it is"
    print(f"AIS, B = 100, T = {args.steps}, C = 16, L = 10, {args.estimates} estimates each, malloc {malloc}")
    for name in CONTENDERS:
        r = trace(name, args.estimates, args.steps, args.pinned)
        print(
            f"{name:>20}: {r['trims']:5.1f} heap trims per estimate, {r['mib_handed_back']:7.1f} MiB handed back, "
            f"{r['faults']:9,.0f} minor page faults"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Start-up cost of the ``dgm`` command against importing torch and Pyro alone.

Contenders, each a fresh process, run interleaved (base, help, list, base, help, list, ...)
for ``rounds`` rounds:

* ``base``: ``python -c "import torch, pyro"``, the floor every command pays;
* ``dgm --help`` and ``dgm list``: what the ``dgm`` console script runs (``from
  experiments.cli import main; main(argv)``), then one line that prints the top-level
  packages the command loaded, so the timed runs also say which heavy libraries
  (``HEAVY``: plotting, ArviZ, SciPy, ...) it loaded. Output discarded.

Measured: CPU time (user + system) of each child, from ``getrusage(RUSAGE_CHILDREN)``
around it; wall time on a shared machine mostly measures the other jobs. Ratio: median CPU
time of the command over the median of ``base``; target at most 1.3. No warm-up run: the
launching process has already read torch, Pyro and the suite from disk.

``python -m benchmarks --only startup`` (or ``python -m benchmarks.startup [--quick]``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from benchmarks.common import REPO, Row, Target, format_table

TARGET = 1.3  # command / base, CPU time, at most
HEAVY = ("matplotlib", "arviz", "scipy", "sklearn", "pandas", "xarray", "numpyro", "jax", "PIL")

# prints the top-level packages it loaded, after the command, as its last line on stderr
_PROBE = (
    "import sys, json\n"
    "from experiments.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
)


@dataclass
class StartupConfig:
    rounds: int = 7

    @classmethod
    def quick(cls) -> "StartupConfig":
        return cls(rounds=3)


def timed_run(cmd: List[str]) -> Tuple[float, str]:
    """User + system CPU seconds of one run of ``cmd``, and its standard error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stderr


def dgm(args: List[str]) -> List[str]:
    """``dgm *args`` as the console script runs it, plus the probe line (see the module docstring)."""
    return [sys.executable, "-c", _PROBE, *args]


def loaded_heavy(stderr: str) -> List[str]:
    """The ``HEAVY`` packages named in the probe line of a ``dgm`` run's standard error."""
    loaded = json.loads(stderr.strip().splitlines()[-1])
    return [m for m in HEAVY if m in loaded]


def heavy_modules(args: List[str]) -> List[str]:
    """The ``HEAVY`` packages loaded by ``dgm *args``."""
    return loaded_heavy(timed_run(dgm(args))[1])


def run(cfg: StartupConfig, log=print) -> List[Row]:
    commands: Dict[str, List[str]] = {
        "base": [sys.executable, "-c", "import torch, pyro"],
        "dgm --help": dgm(["--help"]),
        "dgm list": dgm(["list"]),
    }
    times: Dict[str, List[float]] = {name: [] for name in commands}
    heavy: Dict[str, List[str]] = {}
    for _ in range(cfg.rounds):
        for name, cmd in commands.items():
            seconds, stderr = timed_run(cmd)
            times[name].append(seconds)
            if name != "base":
                heavy[name] = loaded_heavy(stderr)
    log(
        f"startup: {cfg.rounds} rounds, CPU s per run: "
        + "; ".join(f"{name} {' '.join(f'{t:.2f}' for t in v)}" for name, v in times.items())
    )
    base = statistics.median(times["base"])
    rows = [Row("start-up (CPU time)", "base: import torch, pyro", base * 1e3, "CPU ms", ratio=1.0)]
    for name in ("dgm --help", "dgm list"):
        med = statistics.median(times[name])
        paired = [t / b for t, b in zip(times[name], times["base"])]
        loaded = ", ".join(heavy[name]) or "none"
        rows.append(
            Row(
                "start-up (CPU time)",
                name,
                med * 1e3,
                "CPU ms",
                ratio=med / base,
                spread=(min(paired), max(paired)),
                target=Target("<=", TARGET),
                note=f"heavy modules loaded: {loaded}",
            )
        )
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(format_table(run(StartupConfig.quick() if args.quick else StartupConfig())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

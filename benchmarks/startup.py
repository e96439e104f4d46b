"""Start-up cost of the ``dgm`` command against importing torch and Pyro alone.

Contenders, each a fresh process, run interleaved (base, help, list, base, help, list, ...)
for ``rounds`` rounds:

* ``base``: ``python -c "import torch, pyro"``, the floor every command pays;
* ``dgm --help`` and ``dgm list``: the console script next to this interpreter (or
  ``python -m experiments.cli`` without one), output discarded.

Measured: CPU time (user + system) of each child, from ``getrusage(RUSAGE_CHILDREN)``
around it; wall time on a shared machine mostly measures the other jobs. Ratio: median CPU
time of the command over the median of ``base``; target at most 1.3. The heavy libraries a
command loaded (``HEAVY``: plotting, ArviZ, SciPy, ...) are printed too; they load only where
a command uses them.

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
from pathlib import Path
from typing import Dict, List, Optional

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


def dgm_command() -> List[str]:
    script = Path(sys.executable).parent / "dgm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "experiments.cli"]


def cpu_seconds(cmd: List[str]) -> float:
    """User + system CPU seconds of one run of ``cmd`` (output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_modules(args: List[str]) -> List[str]:
    """The ``HEAVY`` packages loaded by ``dgm *args``."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    return [m for m in HEAVY if m in loaded]


def run(cfg: StartupConfig, log=print) -> List[Row]:
    dgm = dgm_command()
    commands: Dict[str, List[str]] = {
        "base": [sys.executable, "-c", "import torch, pyro"],
        "dgm --help": dgm + ["--help"],
        "dgm list": dgm + ["list"],
    }
    for cmd in commands.values():  # warm the file cache
        cpu_seconds(cmd)
    times: Dict[str, List[float]] = {name: [] for name in commands}
    for _ in range(cfg.rounds):
        for name, cmd in commands.items():
            times[name].append(cpu_seconds(cmd))
    heavy = {name: heavy_modules(cmd[len(dgm) :]) for name, cmd in commands.items() if name != "base"}
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

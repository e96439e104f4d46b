"""Run every benchmark and print one table: ``python -m benchmarks [--quick] [--threads N]``.

Benchmarks report, they do not gate: the exit code is 0 even when a target is missed
(a MISS is printed loudly instead).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import List, Optional

import pyro
import torch

from benchmarks import ais, ar_sampling, estimator, nade, objectives, startup, svi_step, wavenet_sampling
from benchmarks.common import banner, format_table, misses, set_threads


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes (~2 min of CPU time)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1, see common.py)")
    p.add_argument(
        "--only",
        choices=("svi", "estimator", "nade", "startup", "sampling", "wavenet", "ais", "objectives"),
        default=None,
        help="one benchmark (ais and objectives run only when named: ~4.5 min / ~90 s with --quick; ~1 min)",
    )
    args = p.parse_args(argv)

    intra, inter = set_threads(args.threads)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(
        f"date {now}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}; "
        f"torch threads: intra-op {intra}, inter-op {inter}"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable), '-m', 'benchmarks', *(argv or sys.argv[1:])])}")
    t0 = time.time()

    est_rows, svi_rows, ais_rows = [], [], []
    # the estimators first: their memory subprocesses should start from a small parent
    if args.only == "ais":
        ais_rows = ais.run(ais.AISConfig.quick() if args.quick else ais.AISConfig(), intra)
    if args.only in (None, "estimator"):
        cfg = estimator.EstimatorConfig.quick() if args.quick else estimator.EstimatorConfig()
        est_rows = estimator.run(cfg, intra)
    if args.only in (None, "svi"):
        cfg = svi_step.SVIConfig.quick() if args.quick else svi_step.SVIConfig()
        svi_rows = svi_step.run(cfg)
    nade_rows = []
    if args.only in (None, "nade"):
        nade_rows = nade.run(nade.NADEBenchConfig.quick() if args.quick else nade.NADEBenchConfig())
    startup_rows = []
    if args.only in (None, "startup"):
        startup_rows = startup.run(startup.StartupConfig.quick() if args.quick else startup.StartupConfig())
    sampling_rows = []
    if args.only in (None, "sampling"):
        cfg = ar_sampling.SamplingConfig.quick() if args.quick else ar_sampling.SamplingConfig()
        sampling_rows = ar_sampling.run(cfg)
    wavenet_rows = []
    if args.only in (None, "wavenet"):
        cfg = wavenet_sampling.WaveNetSamplingConfig.quick() if args.quick else wavenet_sampling.WaveNetSamplingConfig()
        wavenet_rows = wavenet_sampling.run(cfg)
    objective_rows = []
    if args.only == "objectives":
        cfg = objectives.ObjectivesConfig.quick() if args.quick else objectives.ObjectivesConfig()
        objective_rows = objectives.run(cfg)
    rows = svi_rows + est_rows + ais_rows + nade_rows + startup_rows + sampling_rows + wavenet_rows + objective_rows

    print()
    print(format_table(rows))
    print(
        f"\n(ratio = median ours / median raw of per-round times; for points/s, ours / raw throughput; "
        f"{time.time() - t0:.0f} s in all)"
    )
    missed = misses(rows)
    if missed:
        for r in missed:
            print(banner(f"MISS: {r.benchmark} / {r.contender}: ratio {r.ratio:.3f}, target {r.target}"))
    else:
        print("all targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

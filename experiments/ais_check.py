"""``dgm reproduce NAME --ais-check N``: how far the experiment's IS numbers sit below AIS.

For each run, on its first ``N`` test images: importance sampling with the run's own
evaluation K (the K of the experiment's table) and AIS (Neal 2001; Wu et al. 2017) from the
prior with the settings of ``AIS`` below. Both are stochastic lower bounds of log p(x) in
expectation, so the paired difference AIS - IS (mean and standard error of the per-image
differences on the same images) estimates how much IS understates log p(x) on these images,
without the spread of log p(x) over images. A run where AIS does not apply (an exact model,
discrete latent sites, global latents) gets one row with AIS's reason. Rows are kept in the
run (``experiments.measured``), so a rerun measures nothing again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from experiments.config import read_config
from experiments.measured import Kept, paired_difference
from models.base import DGMError

AIS = dict(steps=1_000, chains=16, leapfrog=10)
"""T, C and L of the check's AIS; it starts at the prior with the sigmoid schedule (``EvalConfig``'s defaults)."""


def ais_settings(n: int, steps: Optional[int] = None) -> Dict:
    """``AIS`` with ``steps`` (``--ais-steps``) in place of its T where given; refuses an
    ``n`` (``--ais-check``) or ``steps`` below 1."""
    if n < 1:
        raise DGMError(f"--ais-check must be a number of test images >= 1, got {n}")
    if steps is not None and steps < 1:
        raise DGMError(f"--ais-steps must be >= 1, got {steps}")
    return {**AIS, **({} if steps is None else {"steps": steps})}


def check_row(run_dir: Path, n: int, ais: Dict) -> str:
    """One run's row of the table (measured, or read from what the run kept)."""
    kept = Kept(run_dir, "ais-check")
    try:
        a = kept.get("ais", ais, n)
    except DGMError as e:  # AIS refuses the model: say why, in its own words
        return f"| {kept.dir.name} | - | - | - | not applicable: {str(e).split(';')[0]} | - | - | - | - |"
    k = read_config(kept.dir / "config.json").eval.k
    i = kept.get("is", dict(k=k), n)
    return (
        f"| {kept.dir.name} | {a['n']} | {k} | {i['log_px']:.2f} ± {i['stderr']:.2f} "
        f"| {a['log_px']:.2f} ± {a['stderr']:.2f} | {paired_difference(a['values'], i['values'])} | {a['trust']} "
        f"| {i['seconds']:.1f} | {a['seconds']:.1f} |"
    )


def ais_check_report(run_dirs: List[Path], n: int, steps: Optional[int] = None) -> str:
    """The "AIS check" section: one row per run."""
    ais = ais_settings(n, steps)
    t, c, leap = ais["steps"], ais["chains"], ais["leapfrog"]
    lines = [
        "## AIS check",
        "",
        f"On the first {n} test images of each run: importance sampling with the run's evaluation K (as in the "
        f"table above) and AIS from the prior (sigmoid schedule, T = {t:,}, C = {c} chains, L = {leap} leapfrog "
        "steps), each the mean log p(x) ± its standard error over the images. AIS - IS: the mean of the "
        "per-image differences on the same images ± its standard error. Both are lower bounds in expectation: a "
        "positive difference is how far IS falls short. AIS trust: the chains' standard error per image "
        "(mc_stderr_mean) and HMC's acceptance rate (accept_mean).",
        "",
        "| run | test images | IS K | IS log p(x) | AIS log p(x) | AIS - IS (paired) | AIS trust | IS seconds "
        "| AIS seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [check_row(Path(d), n, ais) for d in run_dirs]) + "\n"

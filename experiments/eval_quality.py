"""``dgm reproduce eval-quality``: how far to trust each estimate of log p(x), the analogue
of Wu, Burda, Salakhutdinov and Grosse (2017), Table 1, on our trained VAEs.

For each run (the ELBO- and IWAE-trained VAEs of ``mnist-iwae``, whose runs it reuses):

* importance sampling with the encoder as proposal at K = 10, 100, 1,000, 10,000 on the first
  ``IS_N`` test images, K = 100,000 on the first ``IS_BIG_N``, and K = 5,000 (the
  ``mnist-iwae`` table's K) on AIS's images;
* AIS (prior start, sigmoid schedule, C = 16 chains, L = 10 leapfrog steps, adaptive step
  size) at T = 100 and 1,000 on the first ``AIS_N`` test images and T = 10,000 on the first
  ``AIS_BIG_N`` (a CPU budget);
* the BDMC gap (forward AIS lower bound against reverse AIS upper bound on data simulated
  from the model) at the largest T, on ``BDMC_N`` simulated points (10: a CPU budget).

Every estimate is a stochastic lower bound of log p(x) in expectation, so on the same
images the larger one is the better one; the table gives each with its standard error,
its trust figure (k-hat share, chains' spread), its wall time and, for AIS, the paired
difference AIS - IS(K = 5,000) on the same images (mean and standard error of the
per-image differences). ``eval-quality.png`` plots log p(x) against seconds for both
estimators. The subsets are stated in the table.

Each row is written to ``RUN/eval-quality.jsonl`` as soon as it is measured (with the
per-image values and a fingerprint of the run's weights) and reused by a later call on the
same weights, so an interrupted evaluation resumes where it stopped, and the two runs can be
measured by two processes at once (``python -m experiments.eval_quality RUN``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from experiments import measured
from experiments.measured import Kept

IS_KS = (10, 100, 1_000, 10_000)
IS_N = 1_000
IS_BIG_K, IS_BIG_N = 100_000, 100
PAIR_K = 5_000  # the IS that AIS is compared with image by image: the mnist-iwae table's K
AIS_TS = (100, 1_000, 10_000)
AIS_N, AIS_BIG_N, AIS_CHAINS, AIS_LEAPFROG = 100, 20, 16, 10
BDMC_N = 10
TINY = dict(ks=(2, 4), n=6, big_k=8, big_n=3, pair_k=4, ts=(2, 3), ais_n=3, ais_big_n=2, chains=2, leapfrog=1, bdmc_n=2)


def _settings(tiny: bool) -> Dict:
    if tiny:
        return TINY
    return dict(
        ks=IS_KS, n=IS_N, big_k=IS_BIG_K, big_n=IS_BIG_N, pair_k=PAIR_K, ts=AIS_TS, ais_n=AIS_N,
        ais_big_n=AIS_BIG_N, chains=AIS_CHAINS, leapfrog=AIS_LEAPFROG, bdmc_n=BDMC_N,
    )  # fmt: skip


def plans(tiny: bool = False) -> List[Tuple[str, Dict, int]]:
    """``(estimator, settings, first n test images)`` of every row, in order."""
    s = _settings(tiny)
    out = [("is", dict(k=k), s["n"]) for k in s["ks"]] + [("is", dict(k=s["big_k"]), s["big_n"])]
    ais_n = {t: s["ais_big_n"] if t == s["ts"][-1] else s["ais_n"] for t in s["ts"]}
    for n in sorted(set(ais_n.values()), reverse=True):  # IS on AIS's own images: the paired difference
        out.append(("is", dict(k=s["pair_k"]), n))
    out += [("ais", dict(steps=t, chains=s["chains"], leapfrog=s["leapfrog"]), ais_n[t]) for t in s["ts"]]
    return out


def measure(run_dir: Path, tiny: bool = False) -> List[Dict]:
    """The rows of one run: each estimator setting with its mean log p(x), standard error,
    trust figure, wall time and per-image values on its stated subset (kept in the run,
    ``experiments.measured``)."""
    kept = Kept(run_dir, "eval-quality")
    return [kept.get(estimator, settings, n) for estimator, settings, n in plans(tiny)] + [
        bdmc_row(run_dir, tiny, kept)
    ]


def bdmc_row(run_dir: Path, tiny: bool = False, kept: Optional[Kept] = None) -> Dict:
    """The BDMC sandwich at the largest T on points simulated from the run's model (also
    recorded in the run's summary)."""
    s = _settings(tiny)
    settings = dict(steps=s["ts"][-1], chains=s["chains"], leapfrog=s["leapfrog"])

    def sandwich() -> Dict:
        from experiments.runs import bdmc_run

        out, _, _ = bdmc_run(run_dir, s["bdmc_n"], progress=True, **settings)
        lower = np.asarray(out["per_datapoint"]["lower"])
        return dict(
            n=out["n"], log_px=out["lower"], stderr=float(np.std(lower, ddof=1) / np.sqrt(len(lower))),
            trust=f"gap {out['gap']:.3g} ± {out['gap_stderr']:.2g} (upper {out['upper']:.2f}), simulated data",
            gap=out["gap"], gap_stderr=out["gap_stderr"],
        )  # fmt: skip

    return (kept or Kept(run_dir, "eval-quality")).get("bdmc", settings, s["bdmc_n"], measure=sandwich)


def paired_difference(rows: List[Dict], row: Dict, pair_k: int) -> str:
    """``AIS - IS(K = pair_k)`` on the same images: the mean per-image difference ± its
    standard error (the spread over images cancels in the pairing)."""
    same = [r for r in rows if r["estimator"] == "is" and r["settings"]["k"] == pair_k and r["n"] == row["n"]]
    if row["estimator"] != "ais" or not same:
        return "-"
    return measured.paired_difference(row["values"], same[0]["values"])


def report(run_dirs: List[Path], tiny: bool = False) -> str:
    """The table (and ``eval-quality.png`` beside the runs) for ``dgm reproduce eval-quality``."""
    pair_k = _settings(tiny)["pair_k"]
    lines = [
        f"| run | estimator | settings | test images | mean log p(x) | ± stderr | AIS - IS K={pair_k} (same images) "
        "| trust | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for d in run_dirs:
        mine = measure(d, tiny)
        rows += mine
        for r in mine:
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            lines.append(
                f"| {r['run']} | {r['estimator']} | {settings} | {r['n']} | {r['log_px']:.2f} | {r['stderr']:.2f} "
                f"| {paired_difference(mine, r, pair_k)} | {r['trust']} | {r['seconds']:.0f} |"
            )
    plot = Path(run_dirs[0]).parent / "eval-quality.png"
    save_plot(rows, plot)
    return "\n".join(lines) + f"\n\nPlot: {plot}\n"


def save_plot(rows: List[Dict], path: Path) -> Path:
    """log p(x) against wall time, one line per run, estimator and subset of test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    rows = [r for r in rows if r["estimator"] != "bdmc"]  # simulated data: not on the same images
    for run in sorted({r["run"] for r in rows}):
        for estimator, marker in (("is", "o"), ("ais", "s")):
            for n in sorted({r["n"] for r in rows if r["run"] == run and r["estimator"] == estimator}, reverse=True):
                pts = [r for r in rows if r["run"] == run and r["estimator"] == estimator and r["n"] == n]
                ax.errorbar(
                    [r["seconds"] for r in pts], [r["log_px"] for r in pts], yerr=[r["stderr"] for r in pts],
                    marker=marker, label=f"{run}: {estimator}, first {n} images", capsize=3,
                )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("mean test log p(x) (nats)")
    ax.set_title("log p(x) estimates against compute (subsets as in the table)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":  # measure one run's rows (cached in the run), e.g. beside another process
    for arg in sys.argv[1:]:
        measure(Path(arg))

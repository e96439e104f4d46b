"""``dgm reproduce eval-quality``: how far to trust each estimate of log p(x), the analogue
of Wu, Burda, Salakhutdinov and Grosse (2017), Table 1, on our trained VAEs.

For each run (the ELBO- and IWAE-trained VAEs of ``mnist-iwae``, whose runs it reuses):

* importance sampling with the encoder as proposal at K = 10, 100, 1,000, 10,000 on the first
  ``IS_N`` test images, K = 100,000 on the first ``IS_BIG_N``, and K = 10,000 on AIS's images;
* AIS (prior start, sigmoid schedule, C = 16 chains, L = 10 leapfrog steps, adaptive step
  size) at T = 100, 1,000, 10,000 on the first ``AIS_N`` test images;
* the BDMC gap (forward AIS lower bound against reverse AIS upper bound on data simulated
  from the model) at the largest T, on ``BDMC_N`` simulated points.

Every estimate is a stochastic lower bound of log p(x) in expectation, so on the same
images the larger one is the better one; the table gives each with its standard error,
its trust figure (k-hat share, chains' spread) and its wall time, and ``eval-quality.png``
plots log p(x) against seconds for both estimators. The subsets are stated in the table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from inference.config import EvalConfig
from inference.evaluation import evaluate

IS_KS = (10, 100, 1_000, 10_000)
IS_N = 1_000
IS_BIG_K, IS_BIG_N = 100_000, 100
AIS_TS = (100, 1_000, 10_000)
AIS_N, AIS_CHAINS, AIS_LEAPFROG = 100, 16, 10
BDMC_N = 20
TINY = dict(ks=(2, 4), n=6, big_k=8, big_n=3, ts=(2, 3), ais_n=3, chains=2, leapfrog=1, bdmc_n=2)


def _settings(tiny: bool) -> Dict:
    if tiny:
        return TINY
    return dict(
        ks=IS_KS, n=IS_N, big_k=IS_BIG_K, big_n=IS_BIG_N, ts=AIS_TS, ais_n=AIS_N, chains=AIS_CHAINS,
        leapfrog=AIS_LEAPFROG, bdmc_n=BDMC_N,
    )  # fmt: skip


def measure(run_dir: Path, tiny: bool = False) -> List[Dict]:
    """The rows of one run: each estimator setting with its mean log p(x), standard error,
    trust figure and wall time on its stated subset."""
    from experiments.runs import load_run

    s = _settings(tiny)
    run = load_run(run_dir)
    x = run.data.test.to(run.device)
    plans = [("is", dict(k=k), s["n"]) for k in s["ks"]] + [("is", dict(k=s["big_k"]), s["big_n"])]
    plans += [("is", dict(k=s["ks"][-1]), s["ais_n"])]  # IS on AIS's own images: the AIS - IS difference
    plans += [("ais", dict(steps=t, chains=s["chains"], leapfrog=s["leapfrog"]), s["ais_n"]) for t in s["ts"]]
    rows = []
    for estimator, settings, n in plans:
        config = EvalConfig(estimator=estimator, limit=n, **settings)
        t0 = time.time()
        out = evaluate(run.model, run.guide, x, config, train=run.config.train)
        trust = ", ".join(f"{field} {out[field]:.3g}" for field in out["trust"])
        rows.append(
            dict(
                run=Path(run_dir).name, estimator=estimator, settings=settings, n=out["n"], log_px=-out["nll"],
                stderr=out["nll_stderr"], trust=trust, seconds=time.time() - t0,
            )
        )  # fmt: skip
    return rows


def bdmc_row(run_dir: Path, tiny: bool = False) -> Dict:
    """The BDMC sandwich at the largest T on points simulated from the run's model (also
    recorded in the run's summary)."""
    from experiments.runs import bdmc_run

    s = _settings(tiny)
    t0 = time.time()
    out, _, _ = bdmc_run(run_dir, s["bdmc_n"], steps=s["ts"][-1], chains=s["chains"], leapfrog=s["leapfrog"])
    lower = np.asarray(out["per_datapoint"]["lower"])
    return dict(
        run=Path(run_dir).name, estimator="bdmc", settings=dict(steps=s["ts"][-1], chains=s["chains"]),
        n=out["n"], log_px=out["lower"], stderr=float(np.std(lower, ddof=1) / np.sqrt(len(lower))),
        trust=f"gap {out['gap']:.3g} ± {out['gap_stderr']:.2g} (upper {out['upper']:.2f}), simulated data",
        seconds=time.time() - t0,
    )  # fmt: skip


def report(run_dirs: List[Path], tiny: bool = False) -> str:
    """The table (and ``eval-quality.png`` beside the runs) for ``dgm reproduce eval-quality``."""
    rows = [row for d in run_dirs for row in measure(d, tiny) + [bdmc_row(d, tiny)]]
    lines = [
        "| run | estimator | settings | test images | mean log p(x) | ± stderr | trust | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(
            f"| {r['run']} | {r['estimator']} | {settings} | {r['n']} | {r['log_px']:.2f} | {r['stderr']:.2f} "
            f"| {r['trust']} | {r['seconds']:.0f} |"
        )
    plot = Path(run_dirs[0]).parent / "eval-quality.png"
    save_plot(rows, plot)
    return "\n".join(lines) + f"\n\nPlot: {plot}\n"


def save_plot(rows: List[Dict], path: Path) -> Path:
    """log p(x) against wall time, one line per run and estimator (same-subset points only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    rows = [r for r in rows if r["estimator"] != "bdmc"]  # simulated data: not on the same images
    for run in sorted({r["run"] for r in rows}):
        for estimator, marker in (("is", "o"), ("ais", "s")):
            pts = [r for r in rows if r["run"] == run and r["estimator"] == estimator]
            if pts:
                ax.errorbar(
                    [r["seconds"] for r in pts], [r["log_px"] for r in pts], yerr=[r["stderr"] for r in pts],
                    marker=marker, label=f"{run}: {estimator}", capsize=3,
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

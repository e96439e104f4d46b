"""Reports of the inference-strategy experiments (issue 13); their runs are defined in
``experiments.reproduce``.

* ``gradient-snr`` (:func:`snr_report`): Rainforth et al. (2018, "Tighter variational bounds
  are not necessarily better"), Figure-style: at a trained VAE's parameters, the SNR of the
  encoder's and the decoder's gradient against K for ``iwae``, ``dreg`` and ``stl``
  (``dgm gradvar`` for each), one table and ``gradient-snr.png``. IWAE's encoder SNR falls
  like ``1/sqrt(K)``, DReG's and STL's do not; the decoder's rises like ``sqrt(K)``.
* ``inference-gaps`` (:func:`gaps_report`): Cremer et al. (2018), Table-style: log p(x),
  ELBO(q*), ELBO(encoder) and the two gaps (``dgm gaps``) of the VAE with a diagonal
  Gaussian encoder and with an IAF guide.
* ``strategies`` (:func:`strategies_report`): every objective and guide on one model at one
  step budget: test log p(x), ELBO, active units, wall time per step (and relative to iwae
  at the same K).
* ``discrete-latents`` (:func:`discrete_report`): SBNs trained with NVIL (``elbo-sf
  --baseline neural``), VIMCO and RWS at one budget, next to MuProp's Table 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

SNR_OBJECTIVES = ("iwae", "dreg", "stl")
SNR_KS = (1, 3, 10, 30, 100)
SNR_ESTIMATES, SNR_BATCH = 100, 100
GAPS_N, GAPS_AIS_STEPS, GAPS_AIS_CHAINS, GAPS_ELBO_SAMPLES, GAPS_REFIT_EPOCHS = 100, 1000, 16, 1000, 500
TINY = dict(ks=(1, 3), estimates=3, batch=10, gaps_n=4, steps=5, chains=2, elbo_samples=10, refit_epochs=3)

MUPROP = {"sbn200": 113.5, "sbn200x2": 99.7}
"""Gu et al. (2016, MuProp), Table 3: test NELBO of NVIL on binarized MNIST (SBN 200 and 200-200)."""


def _read(run_dir: Path) -> Dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _fmt(value, fmt: str = ".2f") -> str:
    return "-" if value is None or value != value else format(value, fmt)


# --- gradient SNR -----------------------------------------------------------------------------
def snr_table(run_dir: Path, tiny: bool = False) -> List[Dict]:
    """One row per (objective, K): the groups' mean SNR and the seconds per estimate."""
    from experiments.runs import gradvar_run

    ks = TINY["ks"] if tiny else SNR_KS
    estimates = TINY["estimates"] if tiny else SNR_ESTIMATES
    batch = TINY["batch"] if tiny else SNR_BATCH
    rows = []
    for objective in SNR_OBJECTIVES:
        for k in ks:
            out, _ = gradvar_run(run_dir, objective, k, estimates, batch_size=batch, plot=False)
            groups = out["groups"]
            rows.append(
                {
                    "objective": objective,
                    "k": k,
                    "encoder_snr": groups["encoder"]["snr"],
                    "decoder_snr": groups["decoder"]["snr"],
                    "seconds": out["seconds_per_estimate"],
                }
            )
    return rows


def snr_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """The SNR table of each run, and ``gradient-snr.png`` beside the runs."""
    lines = []
    for d in run_dirs:
        rows = snr_table(d, tiny)
        iwae = {r["k"]: r["seconds"] for r in rows if r["objective"] == "iwae"}
        lines += [
            f"Gradient SNR at the parameters of {Path(d).name} (mean over parameters of |mean| / std of "
            f"{TINY['estimates'] if tiny else SNR_ESTIMATES} estimates on {TINY['batch'] if tiny else SNR_BATCH} "
            "training images):",
            "",
            "| objective | K | encoder SNR | decoder SNR | s per estimate | time vs iwae |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['objective']} | {r['k']} | {r['encoder_snr']:.4g} | {r['decoder_snr']:.4g} "
                f"| {r['seconds']:.3f} | {r['seconds'] / iwae[r['k']]:.2f} |"
            )
        lines.append("")
        path = Path(d).parent / f"gradient-snr-{Path(d).name}.png"
        plot_snr_against_k(rows, path, Path(d).name)
        lines.append(f"Plot: {path}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_snr_against_k(rows: List[Dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for group, ax in zip(("encoder", "decoder"), axes):
        for objective in SNR_OBJECTIVES:
            pts = [(r["k"], r[f"{group}_snr"]) for r in rows if r["objective"] == objective]
            ax.plot(*zip(*pts), marker="o", label=objective)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel(f"{group} gradient SNR")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- inference gaps ---------------------------------------------------------------------------
def gaps_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """The gaps of each run on its first test images."""
    from experiments.runs import gaps_run

    s = TINY if tiny else {}
    lines = [
        "| run | guide | n | log p(x) | ELBO(q*) | ELBO(encoder) | approximation gap | amortization gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        out, _ = gaps_run(
            d,
            s.get("gaps_n", GAPS_N),
            steps=s.get("steps", GAPS_AIS_STEPS),
            chains=s.get("chains", GAPS_AIS_CHAINS),
            elbo_samples=s.get("elbo_samples", GAPS_ELBO_SAMPLES),
            refit_epochs=s.get("refit_epochs", GAPS_REFIT_EPOCHS),
            progress=not tiny,
        )
        lines.append(
            f"| {Path(d).name} | {out['guide']} | {out['n']} | {out['log_px']:.2f} ({out['log_px_method']}) "
            f"| {out['elbo_best']:.2f} | {out['elbo_encoder']:.2f} "
            f"| {out['approximation']:.2f} ± {out['approximation_stderr']:.2f} "
            f"| {out['amortization']:.2f} ± {out['amortization_stderr']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# --- strategies and discrete latents ------------------------------------------------------------
def _per_step(s: Dict) -> float:
    return s["train_seconds"] / max(s["steps"], 1)


def strategies_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """One row per run: objective, guide, test log p(x), ELBO, active units, seconds per
    step, and the time per step relative to iwae at the same K (where that run exists)."""
    summaries = [(Path(d).name, _read(d)) for d in run_dirs]
    iwae = {s["k"]: _per_step(s) for _, s in summaries if s["objective"] == "iwae" and "amortized" in s["guide"]}
    lines = [
        "| run | objective | K | guide | test log p(x) | test ELBO | active units | steps | s/step | vs iwae |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries:
        t = s["test"]
        rel = _per_step(s) / iwae[s["k"]] if s["k"] in iwae else None
        lines.append(
            f"| {name} | {s['objective']} | {s['k']} | {s['guide']} | {_fmt(-t['nll'])} | {_fmt(t.get('elbo'))} "
            f"| {t.get('active_units', '-')} | {s['steps']} | {_per_step(s):.4f} | {_fmt(rel)} |"
        )
    return "\n".join(lines) + "\n"


def discrete_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """Test NELBO and NLL of each SBN run next to MuProp's NVIL number for its architecture."""
    lines = [
        "| run | objective | K | epochs | steps | test NELBO | test NLL (IS) | MuProp NVIL NELBO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        s = _read(d)
        t = s["test"]
        arch = Path(d).name.split("-")[0]
        nelbo = -t["elbo"] if t.get("elbo") is not None else None
        lines.append(
            f"| {Path(d).name} | {s['objective']} | {s['k']} | {s['epochs']} | {s['steps']} | {_fmt(nelbo)} "
            f"| {_fmt(t['nll'])} | {_fmt(MUPROP.get(arch))} |"
        )
    return "\n".join(lines) + "\n"

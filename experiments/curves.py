"""Training curves of a run: ``curves.png`` drawn from its ``metrics.jsonl``.

Panels, all against optimizer steps: the training bound (the mean over each logged window of
steps, as the runner writes it) and the validation bound (after each epoch); the bound's
terms as the objective logs them (``recon`` and ``kl`` for a VAE; a model's own terms
otherwise), in nats per datapoint; and the learning rate where it changes. Divergence
rollbacks are marked with vertical lines.

``train_run`` calls :func:`save_curves` at the end of every run; ``save_curves(RUN_DIR)``
redraws it for any run directory. matplotlib is imported inside the plotting function
(Agg backend), so importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from models.base import DGMError

PathLike = Union[str, Path]
NOT_TERMS = ("step", "epoch", "split", "bound", "loss", "lr")
"""Keys of a training record that are not terms of the bound."""


def read_metrics(run_dir: PathLike) -> List[Dict]:
    """The records of ``RUN/metrics.jsonl`` (a torn last line, left by a kill, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DGMError(f"{path} does not exist; train the run first (`dgm train`)")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def curves(records: List[Dict]) -> Dict[str, Dict[str, List[float]]]:
    """The panels' series, ``{panel: {series name: ([steps], [values])}}`` for the panels
    ``bound`` (training and validation), ``terms`` and ``lr``; series without points are left out."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]

    def series(rows, key):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return ([s for s, _ in points], [v for _, v in points])

    terms = sorted({k for r in train for k, v in r.items() if k not in NOT_TERMS and isinstance(v, (int, float))})
    terms = [t for t in terms if any(r.get(t) for r in train)]  # a term that is 0 throughout (no KL) says nothing
    out = {
        "bound": {"training bound": series(train, "bound"), "validation bound": series(val, "bound")},
        "terms": {name: series(train, name) for name in terms},
        "lr": {"learning rate": series(train, "lr")},
    }
    return {panel: {k: v for k, v in lines.items() if v[0]} for panel, lines in out.items()}


def save_curves(run_dir: PathLike, out: Optional[PathLike] = None, title: Optional[str] = None) -> Path:
    """Draw the curves of the run in ``run_dir`` into ``out`` (default ``RUN/curves.png``);
    ``title`` defaults to the run's name and configuration. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = curves(records)
    if not panels["bound"]:
        raise DGMError(f"{run_dir / 'metrics.jsonl'} has no training records yet; train the run first")
    lr = panels["lr"].get("learning rate")
    shown = ["bound"] + (["terms"] if panels["terms"] else []) + (["lr"] if lr and len(set(lr[1])) > 1 else [])
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.6 * len(shown) + 0.6), sharex=True, squeeze=False)
    labels = {"bound": "bound (nats per datapoint)", "terms": "terms (nats per datapoint)", "lr": "learning rate"}
    rollbacks = [r["step"] for r in records if r.get("split") == "rollback"]
    for ax, panel in zip(axes[:, 0], shown):
        for name, (steps, values) in panels[panel].items():
            marker = "o" if name == "validation bound" or len(steps) < 30 else None  # few points: show each
            ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.2)
        for step in rollbacks:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
        if panel == "lr":
            ax.set_yscale("log")
        ax.set_ylabel(labels[panel])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(title or _title(run_dir), fontsize=9)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(run_dir: Path) -> str:
    """``RUN: model[preset] on data, objective``, as far as the run's config says."""
    from experiments.config import read_config

    try:
        config = read_config(run_dir / "config.json")
    except DGMError:
        return run_dir.name
    from experiments.run_names import fully_observed

    if fully_observed(config):  # fitted on log p(x) itself: no objective to name
        return f"{run_dir.name}: {config.describe()}"
    return f"{run_dir.name}: {config.describe()}, {config.objective.describe()}"

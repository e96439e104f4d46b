"""``dgm report RUN ... --out report.html``: one self-contained HTML page about runs.

The page holds the summary table of the runs (the columns of ``dgm compare``), then one
section per run: its diagnostics (estimator and its settings, the trust figures the
estimator declares, such as the share of points with PSIS k-hat > 0.7 for IS or the chains'
spread and acceptance for AIS, the BDMC gap where one was measured, any warning), the
settings that differ from the defaults, its training curves (``curves.png``, drawn from
``metrics.jsonl`` if the run has none) and its samples (the pictures the run wrote, or
text samples; where a finished run has none they are drawn with its dataset's sample
format).

Nothing on the page is fetched: images are inlined as base64 ``data:`` URIs and the style
sheet is inline, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

from models.base import DGMError

PathLike = Union[str, Path]

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
section { margin: 2em 0; } .figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; text-align: center; }
img { max-width: 520px; border: 1px solid #ddd; } pre { background: #f6f6f6; padding: 0.5em; font-size: 0.85em; }
.warning { color: #8a4b00; background: #fff4e0; padding: 0.4em 0.6em; border-left: 3px solid #e0a030; }
.muted { color: #777; }
"""

PICTURES = ("samples.png", "density.png", "completions-top-half.png", "latent-interpolate.png", "latent-project.png")
"""Pictures a run directory may hold, shown in this order (curves.png is shown apart)."""
TEXT_SAMPLES = ("samples.txt",)
TRUST_LABELS = {
    "khat_frac_above_0.7": "share of test points with PSIS k-hat > 0.7 (IS unreliable there)",
    "mc_stderr_mean": "mean standard error over the AIS chains",
    "accept_mean": "mean HMC acceptance rate of AIS",
}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_table(run_dirs: Sequence[Path], summaries: Sequence[Optional[dict]]) -> str:
    """The columns of ``dgm compare`` (those with a value for some run), one row per run."""
    from experiments.runs import COLUMNS

    cells = []
    for summary in summaries:
        if summary is None:
            cells.append(["(not finished)"] + ["-"] * (len(COLUMNS) - 1))
            continue
        row = []
        for _, cell in COLUMNS:
            try:
                row.append(cell(summary))
            except (KeyError, TypeError, ValueError):
                row.append("-")
        cells.append(row)
    keep = [j for j in range(len(COLUMNS)) if any(row[j] != "-" for row in cells)]
    rows = [[Path(d).name] + [row[j] for j in keep] for d, row in zip(run_dirs, cells)]
    return _table(["run"] + [COLUMNS[j][0] for j in keep], rows)


def _diagnostics(summary: Optional[dict], config) -> str:
    """Estimator, its settings and trust figures, the BDMC gap, training facts, warnings."""
    from experiments.runs import describe_estimator, format_number

    if summary is None:
        return '<p class="muted">No summary.json: the run is not finished (its curves show how far it got).</p>'
    test = summary.get("test", {})
    rows = [("estimator", describe_estimator(test) if "estimator" in test else "-")]
    if test.get("nll") is not None:
        nll, stderr = format_number(test["nll"], ".3f"), format_number(test.get("nll_stderr"), ".3f")
        rows.append(("test NLL (nats)", f"{nll} ± {stderr} (n={test.get('n')})"))
    if test.get("elbo") is not None:
        rows.append(("test ELBO", format_number(test["elbo"], ".3f")))
    for field in test.get("trust", ()):
        fmt = ".1%" if "frac" in field else ".4g"  # a share of the test points, as a percentage
        rows.append((f"trust: {TRUST_LABELS.get(field, field)}", format_number(test.get(field), fmt)))
    for field in ("ess_mean", "khat_mean", "mc_stderr_mean", "accept_mean"):
        if test.get(field) is not None and field not in test.get("trust", ()):
            rows.append((field, format_number(test[field], ".4g")))
    bdmc = summary.get("bdmc")
    if bdmc:
        rows.append(
            (
                "BDMC gap",
                f"{bdmc['gap']:.3f} ± {format_number(bdmc.get('gap_stderr'), '.3f')} nats "
                f"(T={bdmc['steps']}, C={bdmc['chains']}, n={bdmc['n']}; lower {bdmc['lower']:.3f}, "
                f"upper {bdmc['upper']:.3f})",
            )
        )
    rows += [
        ("data", summary.get("data", "-")),
        ("epochs / steps", f"{summary.get('epochs')} / {summary.get('steps')}"),
        ("best validation bound", format_number(summary.get("best_val_bound"), ".3f")),
        ("training seconds", format_number(summary.get("train_seconds"), ".1f")),
        ("device", summary.get("device", "-")),
    ]
    if config is not None:
        from inference.lr_schedules import describe

        rows.append(("learning rate", describe(config.train)))
    out = _table(["diagnostic", "value"], rows)
    if test.get("warning"):
        out += f'<p class="warning">warning: {_e(test["warning"])}</p>'
    return out


def _settings(config) -> str:
    """The run's settings that differ from the defaults."""
    from experiments.config import non_default_settings

    changed = non_default_settings(config)
    if not changed:
        return '<p class="muted">All settings at their defaults.</p>'
    return _table(["setting", "value"], [(f"--{k.replace('_', '-')}", v) for k, v in changed.items()])


def _curves(run_dir: Path, scratch: Path) -> str:
    from experiments.curves import save_curves

    path = run_dir / "curves.png"
    if not path.exists():
        if not (run_dir / "metrics.jsonl").exists():
            return '<p class="muted">No metrics.jsonl: no curves.</p>'
        try:
            path = save_curves(run_dir, scratch / f"{run_dir.name}-curves.png")
        except DGMError as e:
            return f'<p class="muted">No curves: {_e(e)}</p>'
    return _img(path, "training and validation bound, terms, learning rate against steps")


def _samples(run_dir: Path, finished: bool, scratch: Path) -> str:
    figures = [_img(run_dir / name, name) for name in PICTURES if (run_dir / name).exists()]
    texts = [_text(run_dir / name) for name in TEXT_SAMPLES if (run_dir / name).exists()]
    if not figures and not texts and finished:
        drawn = _draw_samples(run_dir, scratch)
        if drawn is not None and drawn.suffix == ".png":
            figures.append(_img(drawn, "samples (drawn for this report)"))
    if not figures and not texts:
        return '<p class="muted">No samples.</p>'
    return "".join(figures + texts)


def _text(path: Path) -> str:
    text = _e(path.read_text(errors="replace")[:4000])
    return f"<figure><pre>{text}</pre><figcaption>{_e(path.name)}</figcaption></figure>"


def _draw_samples(run_dir: Path, scratch: Path) -> Optional[Path]:
    """Samples of a finished run drawn with its dataset's sample format (``None`` where the
    dataset has none or the run cannot be loaded)."""
    from experiments.runs import load_run

    try:
        run = load_run(run_dir)
        return run.data.samples.write(run.model, scratch / f"{run_dir.name}-samples.png", run_dir, title=run_dir.name)
    except (DGMError, OSError, NotImplementedError):
        return None


def _section(run_dir: Path, summary: Optional[dict], scratch: Path) -> str:
    from experiments.config import read_config

    try:
        config = read_config(run_dir / "config.json")
    except DGMError:
        config = None
    title = _e(run_dir.name) + (f' <span class="muted">({_e(config.describe())})</span>' if config else "")
    return (
        f'<section class="run" id="{_e(run_dir.name)}"><h2>{title}</h2>'
        f'<p class="muted">{_e(run_dir.resolve())}</p>'
        f"<h3>Diagnostics</h3>{_diagnostics(summary, config)}"
        f"<h3>Settings</h3>{_settings(config) if config else ''}"
        f'<h3>Curves and samples</h3><div class="figures">{_curves(run_dir, scratch)}'
        f"{_samples(run_dir, summary is not None, scratch)}</div></section>"
    )


def write_report(run_dirs: Sequence[PathLike], out: PathLike, title: str = "pyro-dgm runs") -> Path:
    """Write the HTML report of ``run_dirs`` to ``out``; returns the path written."""
    run_dirs: List[Path] = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise DGMError("name at least one run directory")
    for d in run_dirs:
        if not (d / "config.json").exists():
            raise DGMError(f"{d} is not a run directory (no config.json); train one with `dgm train`")
    summaries = [_read_json(d / "summary.json") if (d / "summary.json").exists() else None for d in run_dirs]
    with tempfile.TemporaryDirectory() as tmp:
        sections = "".join(_section(d, s, Path(tmp)) for d, s in zip(run_dirs, summaries))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
        f"<h2>Summary</h2>{summary_table(run_dirs, summaries)}{sections}</body></html>\n"
    )
    out = Path(out)
    tmp_out = Path(str(out) + ".tmp")
    tmp_out.write_text(page, encoding="utf-8")
    tmp_out.replace(out)
    return out

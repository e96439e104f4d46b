"""Every run of the latent-variable experiments goes through the pipeline: each spec is
trained for a few steps on the embedded MNIST subset (instead of the full set), evaluated,
summarised and tabulated, so a bad preset, objective or option fails here rather than an
hour into ``dgm reproduce``."""

import json
import math
from dataclasses import replace

import pytest

from experiments.reproduce import EXPERIMENTS, TINY
from experiments.runs import compare, train_run
from models import MODELS

LATENT = ["mnist-vae2", "sbn", "m2", "mixtures", "iaf-guide", "flows-toy", "gaussian-vae"]


def test_every_experiment_names_registered_models_and_presets():
    for name, exp in EXPERIMENTS.items():
        for run_name, config in exp.runs:
            cls = MODELS[config.model.name]
            assert config.model.preset is None or config.model.preset in cls.presets, (name, run_name)


@pytest.mark.parametrize("name", LATENT)
def test_latent_experiment_runs_end_to_end_on_the_embedded_subset(name, tmp_path, one_thread):
    dirs = []
    for run_name, config in EXPERIMENTS[name].runs:
        sources = ("mnist", "mnist-dequantized", "digits-dequantized", "moons", "rings", "checkerboard")
        assert config.data.name in sources
        small = dict(TINY["eval"], k=5)
        data = {"mnist": "mnist-embedded", "mnist-dequantized": "digits-dequantized"}.get(
            config.data.name, config.data.name
        )
        config = replace(
            config,
            data=replace(config.data, name=data),
            train=replace(config.train, device="cpu", **TINY["train"]),
            eval=replace(config.eval, **small),
        )
        summary = train_run(config, tmp_path / run_name)
        # EM: 1 step per epoch
        assert summary["steps"] == (1 if config.objective.name == "em" else TINY["train"]["max_steps"])
        assert summary["test"]["n"] == TINY["eval"]["limit"]
        dirs.append(tmp_path / run_name)
        if config.data.labelled is not None:
            assert 0.0 <= summary["test"]["accuracy"] <= 1.0
            written = json.loads((tmp_path / run_name / "config.json").read_text())
            assert written["data"]["labelled"] == config.data.labelled
        if data == "digits-dequantized":  # bits/dim of the 17 levels, D = 64
            d = 64
            assert summary["test"]["bits_per_dim"] == pytest.approx(
                (summary["test"]["nll"] + d * math.log(17)) / (d * math.log(2))
            )
        if data in ("moons", "rings", "checkerboard"):
            assert (tmp_path / run_name / "density.png").exists()
    table = compare(dirs)
    assert all(d.name in table for d in dirs)


def test_vqvae_experiment_fits_both_code_priors_and_tabulates_the_bounds(tmp_path, one_thread):
    from experiments.reproduce import VQ_PRIORS, vqvae_report

    [(run_name, config)] = EXPERIMENTS["vqvae"].runs
    config = replace(
        config,
        data=replace(config.data, name="mnist-embedded"),
        model=replace(config.model, preset="small"),
        train=replace(config.train, device="cpu", **TINY["train"]),
        eval=replace(config.eval, **TINY["eval"]),
    )
    train_run(config, tmp_path / run_name)
    table = vqvae_report([tmp_path / run_name], tiny=True)
    rows = [ln for ln in table.splitlines() if ln.startswith(f"| {run_name} |")]
    assert len(rows) == len(VQ_PRIORS)
    for row, (prior, _, _) in zip(rows, VQ_PRIORS):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith(prior)
        uniform, prior_nll, learned = float(cells[5].split()[0]), float(cells[6]), float(cells[7].split()[0])
        recon = float(cells[3])
        assert learned == pytest.approx(recon + prior_nll, abs=0.02)  # the bound is the sum of its two parts
        assert uniform == pytest.approx(recon + 49 * math.log(8), abs=0.02)  # small preset: K = 8 codes


def test_a_finished_run_is_reused_from_another_device_setting_but_not_with_another_lr(tmp_path, one_thread):
    from experiments.config import RunConfig
    from inference.config import EvalConfig
    from inference.runner import TrainConfig
    from models.base import DGMError

    config = RunConfig.from_flat(
        model="vae",
        preset="small",
        data="digits",
        train=TrainConfig(device="cpu", **TINY["train"]),
        eval=EvalConfig(**TINY["eval"]),
    )
    first = train_run(config, tmp_path / "run")
    again = train_run(replace(config, train=replace(config.train, device="auto", progress=True)), tmp_path / "run")
    assert again == first  # the finished run, not a new one
    with pytest.raises(DGMError, match="different configuration"):
        train_run(replace(config, train=replace(config.train, lr=0.5)), tmp_path / "run")


def test_eval_quality_tabulates_is_and_ais_on_stated_subsets(tmp_path, one_thread, monkeypatch):
    from experiments.eval_quality import TINY as SMALL
    from experiments.eval_quality import measure, plans, report

    dirs = []
    for run_name, config in EXPERIMENTS["eval-quality"].runs:
        config = replace(
            config,
            data=replace(config.data, name="mnist-embedded"),
            train=replace(config.train, device="cpu", **TINY["train"]),
            eval=replace(config.eval, **TINY["eval"]),
        )
        train_run(config, tmp_path / run_name)
        dirs.append(tmp_path / run_name)
    table = report(dirs, tiny=True)
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table.splitlines() if ln.startswith("| vae-")]
    per_run = len(plans(tiny=True)) + 1  # and the BDMC row
    assert len(rows) == 2 * per_run
    for cells in rows:
        images = int(cells[3])
        ais_n = SMALL["ais_big_n"] if cells[2].startswith(f"steps={SMALL['ts'][-1]},") else SMALL["ais_n"]
        assert images == (ais_n if cells[1] == "ais" else images) and float(cells[4]) < 0
        trust = {"is": "khat", "ais": "mc_stderr_mean", "bdmc": "gap"}[cells[1]]
        assert trust in cells[7]
        if cells[1] == "ais":  # the paired difference's mean is the difference of the two means
            same = [c for c in rows if c[0] == cells[0] and c[2] == f"k={SMALL['pair_k']}" and c[3] == cells[3]]
            diff = float(cells[6].split("±")[0])
            assert diff == pytest.approx(float(cells[4]) - float(same[0][4]), abs=0.011)
        else:
            assert cells[6] == "-"
    # every row was kept in its run: a second report measures nothing and says the same
    import inference.evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(inference.evaluation, "evaluate", refuse)
    monkeypatch.setattr("experiments.runs.bdmc_run", refuse)
    assert report(dirs, tiny=True) == table
    # new weights: the kept rows no longer count
    final = dirs[0] / "final.pt"
    final.write_bytes(final.read_bytes() + b"")
    import os

    os.utime(final, ns=(1, 1))
    with pytest.raises(AssertionError, match="measured again"):
        measure(dirs[0], tiny=True)
    assert (tmp_path / "eval-quality.png").exists()


def _check_rows(table: str) -> dict:
    """The AIS check's rows of ``table``, by run: their cells."""
    section = table[table.index("## AIS check") :].split("|---|")[-1]  # after the header
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines()[1:]]
    return {cells[0]: cells for cells in rows}


def _mean_and_se(cell: str):
    mean, se = cell.split("±")
    return float(mean), float(se)


def _assert_paired(run_dir, cells, n: int, steps: int) -> None:
    """The row's AIS - IS is the mean ± standard error of the per-image differences of the
    two estimates the row shows, on the same first ``n`` images, IS at the run's own K."""
    import numpy as np

    from experiments.ais_check import AIS
    from experiments.config import read_config
    from experiments.measured import Kept

    k = read_config(run_dir / "config.json").eval.k
    assert int(cells[1]) == n and int(cells[2]) == k
    (is_mean, _), (ais_mean, _) = _mean_and_se(cells[3]), _mean_and_se(cells[4])
    diff, diff_se = _mean_and_se(cells[5])
    assert diff == pytest.approx(ais_mean - is_mean, abs=0.011)  # the pairing's mean: the difference of the means
    kept = Kept(run_dir, "test")
    a, i = kept.get("ais", {**AIS, "steps": steps}, n), kept.get("is", dict(k=k), n)
    assert np.mean(a["values"]) == pytest.approx(ais_mean, abs=0.006)
    assert np.mean(i["values"]) == pytest.approx(is_mean, abs=0.006)
    d = np.asarray(a["values"]) - np.asarray(i["values"])
    assert len(d) == n and diff_se == pytest.approx(d.std(ddof=1) / math.sqrt(n), abs=0.006)
    assert "accept_mean" in cells[6] and "mc_stderr_mean" in cells[6]


def test_ais_check_pairs_ais_with_each_runs_own_is_on_the_same_images(tmp_path, one_thread, monkeypatch):
    from experiments.reproduce import reproduce

    n, steps = 4, 5
    table = reproduce("quickstart", out=tmp_path / "q", device="cpu", tiny=True, ais_check=n, ais_steps=steps)
    assert (tmp_path / "q" / "results.md").read_text() == table
    rows = _check_rows(table)
    assert list(rows) == [run_name for run_name, _ in EXPERIMENTS["quickstart"].runs]  # one row per run
    for run_name, cells in rows.items():
        _assert_paired(tmp_path / "q" / run_name, cells, n, steps)
    # every estimate was kept in its run: a rerun measures nothing and says the same
    import inference.evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(inference.evaluation, "evaluate", refuse)
    assert reproduce("quickstart", out=tmp_path / "q", device="cpu", tiny=True, ais_check=n, ais_steps=steps) == table


def test_ais_check_says_why_ais_does_not_apply_and_kept_estimates_pass_the_labels(tmp_path, one_thread):
    import torch

    from experiments.ais_check import ais_check_report
    from experiments.measured import Kept
    from inference.config import EvalConfig
    from inference.evaluation import evaluate

    runs = [EXPERIMENTS["anomaly"].runs[0], EXPERIMENTS["sbn"].runs[0], EXPERIMENTS["m2"].runs[0]]
    assert [config.model.name for _, config in runs] == ["fvsbn", "sbn", "m2"]
    for run_name, config in runs:
        config = replace(
            config,
            data=replace(config.data, name="mnist-embedded"),
            train=replace(config.train, device="cpu", **TINY["train"]),
            eval=replace(config.eval, **TINY["eval"]),
        )
        train_run(config, tmp_path / run_name)
    rows = _check_rows(ais_check_report([tmp_path / run_name for run_name, _ in runs], 3, 3))
    fvsbn, sbn, m2 = (rows[run_name] for run_name, _ in runs)
    assert fvsbn[4] == "not applicable: FVSBN has no latent sites"  # exact: nothing to anneal
    for cells in (sbn, m2):  # SBN's units; M2's y_unobserved site (all of it masked when y is given)
        assert cells[4].startswith("not applicable: AIS moves continuous latents, but site") and "discrete" in cells[4]
    assert fvsbn[1:4] == sbn[1:4] == m2[1:4] == ["-"] * 3
    # M2's kept estimates are of log p(x, y) with the test labels, as in its table
    kept = Kept(tmp_path / runs[2][0], "test")
    run = kept.run
    assert run.data.test_labels is not None  # loaded before the seed: loading draws no numbers after it
    torch.manual_seed(0)
    values = kept.get("is", dict(k=4), 3)["values"]
    torch.manual_seed(0)
    config = EvalConfig(estimator="is", k=4, limit=3)
    out = evaluate(
        run.model, run.guide, run.data.test, config, conditions={"y": run.data.test_labels}, keep_values=True
    )
    assert values == pytest.approx(out["log_px"], abs=1e-9)

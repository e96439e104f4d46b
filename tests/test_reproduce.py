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

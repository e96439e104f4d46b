"""The inference-strategy experiments (``gradient-snr``, ``inference-gaps``, ``strategies``,
``discrete-latents``) run end to end with their tiny settings on the embedded MNIST subset,
and their tables say what the instruments compute."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from experiments.reproduce import EXPERIMENTS, TINY
from experiments.runs import train_run
from experiments.strategies import SNR_OBJECTIVES
from experiments.strategies import TINY as STRATEGY_TINY


def _train(name, tmp_path):
    dirs = []
    for run_name, config in EXPERIMENTS[name].runs:
        assert config.data.name == "mnist"
        config = replace(
            config,
            data=replace(config.data, name="mnist-embedded"),
            train=replace(config.train, device="cpu", **TINY["train"]),
            eval=replace(config.eval, **dict(TINY["eval"], k=5)),
        )
        train_run(config, tmp_path / run_name)
        dirs.append(tmp_path / run_name)
    return dirs


def _rows(table: str):
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]


def test_gradient_snr_measures_every_objective_at_every_k(tmp_path, one_thread):
    [d] = _train("gradient-snr", tmp_path)
    table = EXPERIMENTS["gradient-snr"].report([d], True)
    rows = [r for r in _rows(table) if r[0] in SNR_OBJECTIVES]
    assert [(r[0], int(r[1])) for r in rows] == [(o, k) for o in SNR_OBJECTIVES for k in STRATEGY_TINY["ks"]]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0  # finite SNRs of both groups
        if r[0] == "iwae":
            assert float(r[5]) == 1.0  # time relative to iwae at the same K
    assert (tmp_path / f"gradient-snr-{d.name}.png").exists()
    for k in STRATEGY_TINY["ks"]:
        out = json.loads((d / f"gradvar_dreg_K{k}.json").read_text())
        assert out["n_estimates"] == STRATEGY_TINY["estimates"] and set(out["groups"]) == {"encoder", "decoder"}


def test_inference_gaps_add_up_to_the_encoders_distance_from_log_px(tmp_path, one_thread):
    dirs = _train("inference-gaps", tmp_path)
    table = EXPERIMENTS["inference-gaps"].report(dirs, True)
    assert len(_rows(table)) == 1 + len(dirs)
    for d in dirs:
        out = json.loads((d / f"gaps_n{STRATEGY_TINY['gaps_n']}.json").read_text())
        assert out["log_px_method"] == "ais" and out["n"] == STRATEGY_TINY["gaps_n"]
        per = out["per_datapoint"]
        for a, b, lp, best, enc in zip(
            per["approximation"], per["amortization"], per["log_px"], per["elbo_best"], per["elbo_encoder"]
        ):
            assert math.isclose(a + b, lp - enc, abs_tol=1e-4) and math.isclose(a, lp - best, abs_tol=1e-4)


@pytest.mark.slow
def test_strategies_tabulates_every_objective_and_guide_at_one_budget(tmp_path, one_thread):
    dirs = _train("strategies", tmp_path)
    rows = _rows(EXPERIMENTS["strategies"].report(dirs, True))[1:]
    assert [r[0] for r in rows] == [d.name for d in dirs]
    assert {r[1] for r in rows} >= {"elbo", "elbo-sf", "iwae", "renyi", "vimco", "dreg", "stl", "rws"}
    for r in rows:
        assert int(r[7]) == TINY["train"]["max_steps"]  # one step budget
        if r[1] == "iwae":
            assert float(r[9]) == 1.0


@pytest.mark.slow
def test_discrete_latents_sits_next_to_muprop(tmp_path, one_thread):
    dirs = _train("discrete-latents", tmp_path)
    rows = _rows(EXPERIMENTS["discrete-latents"].report(dirs, True))[1:]
    assert len(rows) == 6
    for r in rows:
        assert r[7] == ("113.50" if r[0].startswith("sbn200-") else "99.70")
        assert int(r[4]) == TINY["train"]["max_steps"]  # one budget

"""curves.png: the series drawn are the run's metrics records, and the file is a PNG."""

import json
import subprocess
import sys

import pytest

from experiments.curves import curves, read_metrics, save_curves
from models.base import DGMError
from tests.helpers import ROOT

RECORDS = [
    {"step": 2, "epoch": 0.5, "split": "train", "bound": -90.0, "recon": 80.0, "kl": 10.0, "loss": 90.0, "lr": 1e-3},
    {"step": 4, "epoch": 1.0, "split": "train", "bound": -85.0, "recon": 76.0, "kl": 9.0, "loss": 85.0, "lr": 5e-4},
    {"step": 4, "epoch": 1, "split": "val", "bound": -86.5},
    {"step": 4, "split": "rollback", "reason": "the loss became nan", "at_step": 5, "lr": 5e-5},
    {"step": 6, "epoch": 1.5, "split": "train", "bound": -84.0, "recon": 75.5, "kl": 8.5, "loss": 84.0, "lr": 5e-5},
]


def _run(tmp_path, records=RECORDS):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "spl')
    return tmp_path


def test_the_curves_are_the_metrics_records(tmp_path):
    records = read_metrics(_run(tmp_path))
    assert len(records) == 5  # the torn last line is skipped
    panels = curves(records)
    assert panels["bound"]["training bound"] == ([2, 4, 6], [-90.0, -85.0, -84.0])
    assert panels["bound"]["validation bound"] == ([4], [-86.5])
    assert set(panels["terms"]) == {"recon", "kl"}  # not loss, lr, epoch
    assert panels["terms"]["kl"] == ([2, 4, 6], [10.0, 9.0, 8.5])
    assert panels["lr"]["learning rate"] == ([2, 4, 6], [1e-3, 5e-4, 5e-5])


def test_save_curves_writes_a_png_and_refuses_a_run_without_metrics(tmp_path):
    path = save_curves(_run(tmp_path), title="a run")
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DGMError, match="does not exist"):
        save_curves(empty)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, experiments.curves, experiments.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_a_term_that_is_zero_throughout_is_not_drawn(tmp_path):
    records = [{"step": s, "split": "train", "bound": -30.0 + s, "recon": 30.0 - s, "kl": 0.0} for s in (1, 2)]
    assert set(curves(records)["terms"]) == {"recon"}  # a fully observed model's "kl" says nothing

"""Anomaly scoring: the ROC AUC, the OOD sets, and `dgm score` / `dgm sample --condition-on`."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from experiments.anomaly import OOD_SETS, ood_set, roc_auc
from experiments.cli import main
from experiments.runs import load_run
from models.base import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (300,), generator=g).double()  # many ties
    b = torch.randint(0, 5, (200,), generator=g).double()
    expected = roc_auc_score([1] * 300 + [0] * 200, torch.cat([a, b]).numpy())
    assert roc_auc(a, b) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_extremes():
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert roc_auc(torch.ones(4), torch.ones(5)) == 0.5
    with pytest.raises(DataError):
        roc_auc(torch.tensor([]), torch.ones(2))


def test_ood_sets_are_binary_mnist_shaped_and_what_they_claim():
    ref = torch.bernoulli(torch.full((50, 784), 0.13), generator=torch.Generator().manual_seed(0))
    sets = {name: ood_set(name, ref) for name in OOD_SETS}
    for x in sets.values():
        assert x.shape == (50, 784) and x.dtype == torch.float32 and ((x == 0) | (x == 1)).all()
    assert torch.equal(sets["inverted"], 1 - ref)
    img = ref.reshape(50, 28, 28)
    # rot90 (counter-clockwise): the top row becomes the left column, read bottom to top
    assert torch.equal(sets["rotated"].reshape(50, 28, 28)[:, :, 0], img[:, 0, :].flip(-1))
    assert abs(float(sets["noise"].mean()) - float(ref.mean())) < 0.01
    assert torch.equal(ood_set("noise", ref), sets["noise"])  # fixed seed
    with pytest.raises(DataError, match="unknown OOD set"):
        ood_set("blur", ref)
    with pytest.raises(DataError, match="784"):
        ood_set("inverted", torch.zeros(3, 64))


@pytest.fixture(scope="module")
def fvsbn_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "fvsbn"
    args = ["train", "fvsbn", "--data", "digits", "--epochs", "3", "--no-progress", "--run-dir", str(run)]
    assert main(args) == 0
    return run


def test_score_writes_exact_log_probs_and_bits_per_dim(fvsbn_run, capsys):
    out = fvsbn_run / "scores.csv"
    assert main(["score", str(fvsbn_run), "--split", "val", "--out", str(out)]) == 0
    assert "bits/dim" in capsys.readouterr().out
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    run = load_run(fvsbn_run)
    data = run.data
    run.model.eval()
    with torch.no_grad():
        exact = run.model.log_prob(data.val).double()
    assert len(rows) == len(data.val)
    lp = torch.tensor([float(r[1]) for r in rows], dtype=torch.float64)
    bits = torch.tensor([float(r[3]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(lp, exact, atol=2e-5, rtol=0)
    torch.testing.assert_close(bits, -exact / (64 * math.log(2)), atol=2e-5, rtol=0)


def test_score_refuses_ood_sets_for_non_mnist_runs(fvsbn_run, capsys):
    assert main(["score", str(fvsbn_run), "--data", "ood:inverted"]) == 2
    assert "784" in capsys.readouterr().err


def test_sample_condition_on_top_half_writes_completions(fvsbn_run, capsys):
    out = fvsbn_run / "completions.png"
    args = ["sample", str(fvsbn_run), "--condition-on", "top-half", "--images", "3", "--per-image", "2"]
    assert main(args + ["--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_condition_on_needs_an_autoregressive_model(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--data", "digits", "--max-steps", "2", "--eval-k", "5", "--no-progress",
                 "--run-dir", str(run)]) == 0
    assert main(["sample", str(run), "--condition-on", "top-half", "--out", str(tmp_path / "c.png")]) == 2
    assert "cannot complete" in capsys.readouterr().err

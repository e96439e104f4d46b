"""A user's own data file (``--data path.npy|path.npz|path.csv``, ``experiments.data.user``):
the splits are the file's arrays or a fixed permutation, the support is inferred or given,
a run records the file, and bad files are refused in one line naming the file."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from experiments import data as datasets
from experiments.cli import main
from experiments.data.user import USER_SPLIT_SEED
from models.base import DataError, DGMWarning


def _rows(t: torch.Tensor) -> set:
    return {tuple(r) for r in t.tolist()}


def _distinct(n: int, d: int = 3) -> np.ndarray:
    """``n`` distinct rows of ``d`` reals (so a split can be traced row by row)."""
    return np.arange(n * d, dtype=np.float64).reshape(n, d) / 7.0 + 0.5


# --- formats and splits -------------------------------------------------------------------------
def test_npz_arrays_are_used_as_given_with_their_labels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        s: rng.integers(0, 2, size=(n, 4, 5)).astype(np.uint8) for s, n in [("train", 30), ("val", 7), ("test", 9)]
    }
    labels = {f"{s}_labels": rng.integers(0, 3, size=len(a)) for s, a in arrays.items()}
    np.savez(tmp_path / "d.npz", **arrays, **labels)
    data = datasets.load(str(tmp_path / "d.npz"))
    assert data.spec.support == "binary" and data.spec.event_shape == (20,) and data.spec.image_shape == (4, 5)
    for s, a in arrays.items():
        torch.testing.assert_close(getattr(data, s), torch.from_numpy(a.reshape(len(a), 20)).float())
        assert torch.equal(getattr(data, f"{s}_labels"), torch.from_numpy(labels[f"{s}_labels"]).long())
    assert data.source["name"] == str((tmp_path / "d.npz").resolve())
    assert data.source["sha256"] == hashlib.sha256((tmp_path / "d.npz").read_bytes()).hexdigest()


def test_npz_without_val_gives_a_fixed_tenth_of_train_to_validation(tmp_path):
    train, test = _distinct(50), _distinct(5) + 1000
    np.savez(tmp_path / "d.npz", train=train, test=test)
    a = datasets.load(str(tmp_path / "d.npz"), seed=0)
    b = datasets.load(str(tmp_path / "d.npz"), seed=7)  # the split does not follow the run's seed
    assert len(a.val) == 5 and len(a.train) == 45
    assert _rows(a.train) | _rows(a.val) == _rows(torch.from_numpy(train).float()) and not _rows(a.train) & _rows(a.val)
    assert torch.equal(a.val, b.val) and torch.equal(a.test, torch.from_numpy(test).float())


def test_npy_is_split_80_10_10_by_a_fixed_permutation(tmp_path):
    x = _distinct(100)
    np.save(tmp_path / "d.npy", x)
    data = datasets.load(str(tmp_path / "d.npy"), seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (80, 10, 10)
    parts = [_rows(data.train), _rows(data.val), _rows(data.test)]
    assert set.union(*parts) == _rows(torch.from_numpy(x).float()) and sum(map(len, parts)) == 100
    order = torch.randperm(100, generator=torch.Generator().manual_seed(USER_SPLIT_SEED))
    torch.testing.assert_close(data.val, torch.from_numpy(x).float()[order[:10]])  # the documented permutation
    assert data.spec.support == "real"


def test_csv_with_or_without_a_header_equals_the_same_npy(tmp_path):
    x = _distinct(40, 2)
    np.save(tmp_path / "d.npy", x)
    np.savetxt(tmp_path / "h.csv", x, delimiter=",", header="a,b", comments="")
    np.savetxt(tmp_path / "n.csv", x, delimiter=",")
    ref = datasets.load(str(tmp_path / "d.npy"))
    for name in ("h.csv", "n.csv"):
        data = datasets.load(str(tmp_path / name))
        for s in ("train", "val", "test"):
            torch.testing.assert_close(getattr(data, s), getattr(ref, s))


def test_support_is_inferred_or_given(tmp_path):
    levels = np.tile(np.arange(17), (12, 4))[:, :64]  # integers 0..16
    np.save(tmp_path / "levels.npy", levels)
    np.save(tmp_path / "bits.npy", levels % 2 == 0)  # booleans
    np.save(tmp_path / "signed.npy", levels - 3)  # negative integers: real
    inferred = datasets.load(str(tmp_path / "levels.npy")).spec
    assert (inferred.support, inferred.num_levels) == ("categorical", 17)
    assert datasets.load(str(tmp_path / "bits.npy")).spec.support == "binary"
    assert datasets.load(str(tmp_path / "signed.npy")).spec.support == "real"
    given = datasets.load(str(tmp_path / "levels.npy"), spec="categorical:256").spec
    assert (given.support, given.num_levels) == ("categorical", 256)
    assert datasets.load(str(tmp_path / "bits.npy"), spec="real").spec.support == "real"
    np.save(tmp_path / "scalars.npy", np.arange(30) * 0.5)  # [N]: N scalars
    scalars = datasets.load(str(tmp_path / "scalars.npy")).spec
    assert (scalars.event_shape, scalars.support) == ((1,), "real")


# --- bad files --------------------------------------------------------------------------------
def _write_bad(tmp_path, case):
    p = tmp_path / "bad"
    good = np.zeros((10, 2))
    if case == "extension":
        p = tmp_path / "bad.txt"
        p.write_text("1,2\n")
    elif case == "missing":
        p = tmp_path / "absent.npy"
    elif case == "npz-arrays":
        p = tmp_path / "bad.npz"
        np.savez(p, x_train=good, x_test=good)
    elif case == "npz-unknown":
        p = tmp_path / "bad.npz"
        np.savez(p, train=good, test=good, extra=good)
    elif case == "ragged":
        p = tmp_path / "bad.csv"
        p.write_text("1,2\n3,4\n5\n6,7\n")
    elif case == "not-a-number":
        p = tmp_path / "bad.csv"
        p.write_text("a,b\n1,2\n3,x\n4,5\n")
    elif case == "nan":
        p = tmp_path / "bad.npy"
        np.save(p, np.array([[0.0, np.nan]] * 10))
    elif case == "inf":
        p = tmp_path / "bad.npy"
        np.save(p, np.array([[0.0, np.inf]] * 10))
    elif case == "strings":
        p = tmp_path / "bad.npy"
        np.save(p, np.array([["a", "b"]] * 10))
    elif case == "objects":
        p = tmp_path / "bad.npy"
        np.save(p, np.array([[1, None]] * 10, dtype=object), allow_pickle=True)
    elif case == "garbage":
        p = tmp_path / "bad.npz"
        p.write_bytes(b"not a zip file")
    elif case == "labels":
        p = tmp_path / "bad.npz"
        np.savez(p, train=good, test=good, train_labels=np.zeros(10) + 0.5)
    elif case == "too-few":
        p = tmp_path / "bad.npy"
        np.save(p, good[:2])
    elif case == "shapes":
        p = tmp_path / "bad.npz"
        np.savez(p, train=good, val=good, test=np.zeros((10, 3)))
    return p


BAD = {
    "extension": "unknown data file type '.txt'",
    "missing": "no such data file",
    "npz-arrays": "needs arrays named train and test",
    "npz-unknown": "unknown array(s) extra",
    "ragged": "line 3: 1 value(s), but line 1 has 2",
    "not-a-number": "line 3: 'x' is not a number",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "strings": "expected numbers",
    "objects": "not a plain numeric .npy",
    "garbage": "not a readable .npz",
    "labels": "train_labels must be integers",
    "too-few": "needs at least 3",
    "shapes": "test rows have shape [3] but train rows [2]",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_refused_in_one_line_naming_it(tmp_path, case):
    path = _write_bad(tmp_path, case)
    with pytest.raises(DataError) as err:
        datasets.load(str(path))
    message = str(err.value)
    assert BAD[case] in message and path.name in message and "\n" not in message


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("binary", "--data-spec binary needs values 0 and 1, found values in [0, 16]"),
        ("categorical:5", "--data-spec categorical:5 needs integers 0..4"),
        ("categorical:1", "unknown --data-spec 'categorical:1'"),
        ("ordinal", "unknown --data-spec 'ordinal'"),
    ],
)
def test_values_outside_a_given_support_are_refused(tmp_path, spec, expected):
    np.save(tmp_path / "levels.npy", np.tile(np.arange(17), (6, 1)))
    with pytest.raises(DataError, match="levels.npy") as err:
        datasets.load(str(tmp_path / "levels.npy"), spec=spec)
    assert expected in str(err.value)


def test_a_spec_for_a_registered_dataset_is_refused():
    with pytest.raises(DataError, match="--data-spec is for data files"):
        datasets.load("digits", spec="binary")


def test_cli_refuses_a_bad_file_before_writing_a_run(tmp_path, capsys):
    path = _write_bad(tmp_path, "ragged")
    run = tmp_path / "run"
    assert main(["train", "vae", "--data", str(path), "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dgm: error: ") and "bad.csv, line 3" in err and len(err.splitlines()) == 1
    assert not run.exists()


# --- a run on a file ----------------------------------------------------------------------------
def test_a_run_on_a_file_records_it_and_evaluates_exactly_its_test_array(tmp_path, capsys):
    from experiments.runs import evaluate_run, load_run

    rng = np.random.default_rng(1)
    arrays = {
        s: (rng.random((n, 6, 6)) < 0.3).astype(np.float32) for s, n in [("train", 200), ("val", 20), ("test", 25)]
    }
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    run = tmp_path / "run"
    flags = ["--data", str(path), "--epochs", "1", "--max-steps", "3", "--device", "cpu", "--no-progress"]
    assert main(["train", "fvsbn", *flags, "--run-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["name"] == str(path.resolve())
    assert config["data"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_run(run).model
    result = evaluate_run(run, estimator="exact")
    with torch.no_grad():
        exact = model.log_prob(torch.from_numpy(arrays["test"].reshape(25, 36))).double()
    assert result["n"] == 25
    torch.testing.assert_close(result["nll"], -exact.mean().item())

    np.savez(path, **{**arrays, "test": arrays["test"][:10]})  # the file changes after the run
    with pytest.warns(DGMWarning, match="mine.npz changed since"):
        load_run(run).data

"""Tests of the experiments/data package: checksums, downloads (127.0.0.1 only), binarization,
splits, the embedded subset and every dataset's defining property."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import math
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import data
from experiments.data import MNIST_SHA256, Dataset, load, mnist_files, read_idx
from experiments.make_embedded import build_subset
from models.base import DataError, DataSpec

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
CLOSED_PORT_MIRROR = "http://127.0.0.1:9/"  # discard port: nothing listens, nothing leaves the host


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Point the user cache and DGM_DATA at tmp paths and every default mirror at a closed
    local port, so no test touches the real cache or the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DGM_DATA", raising=False)
    monkeypatch.setenv("DGM_MNIST_MIRRORS", CLOSED_PORT_MIRROR)


@pytest.fixture(scope="module")
def mnist_root() -> Path:
    if not all((SHARED_MNIST / name).is_file() for name in MNIST_SHA256):
        pytest.skip(f"canonical MNIST files not found in {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture(scope="module")
def dynamic(mnist_root) -> Dataset:
    return load("mnist", root=mnist_root)


@pytest.fixture(scope="module")
def grey(mnist_root) -> Dataset:
    return load("mnist", root=mnist_root, binarization="none")


def _sha_of_content(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


# --- checksums and local files -----------------------------------------------------------------


def test_checksum_constants_match_the_shared_sums(mnist_root):
    lines = (mnist_root / "SHA256SUMS.decompressed").read_text().split("\n")
    sums = {name + ".gz": digest for digest, name in (line.split() for line in lines if line.strip())}
    assert sums == MNIST_SHA256


def test_shared_files_verify_and_are_checked_once_per_process(mnist_root, monkeypatch):
    assert mnist_files(root=mnist_root) == mnist_root
    calls = []
    monkeypatch.setattr("experiments.data.files._checksum_problem", lambda *a: calls.append(a))
    assert mnist_files(root=mnist_root, download=False) == mnist_root
    assert calls == []  # verified already: no second pass over 55 MB


def test_dgm_data_and_its_mnist_subfolder_are_found(mnist_root, monkeypatch, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mnist").symlink_to(mnist_root, target_is_directory=True)
    monkeypatch.setenv("DGM_DATA", str(tmp_path / "d"))
    assert mnist_files(download=False) == tmp_path / "d" / "mnist"
    monkeypatch.setenv("DGM_DATA", str(mnist_root))
    assert mnist_files(download=False) == mnist_root


def test_locally_found_corrupt_file_is_rejected(mnist_root, tmp_path):
    for name in MNIST_SHA256:
        shutil.copy(mnist_root / name, tmp_path / name)
    labels = bytearray(gzip.decompress((mnist_root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[-1] = (labels[-1] + 1) % 10  # still a valid idx file, one label changed
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*checksum mismatch") as err:
        mnist_files(root=tmp_path)
    assert MNIST_SHA256["t10k-labels-idx1-ubyte.gz"] in str(err.value)


def test_missing_files_say_where_was_searched_and_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="no complete set of MNIST files"):
        mnist_files(root=tmp_path)
    with pytest.raises(DataError, match="DGM_DATA") as err:
        mnist_files(download=False)
    assert str(data.mnist_cache_dir()) in str(err.value)
    assert str(data.mnist_cache_dir()).startswith(str(tmp_path))  # the isolated cache


# --- download from a local mirror --------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def mirror(mnist_root, tmp_path_factory):
    """An HTTP server on 127.0.0.1 with folders good/, flipped/ (train labels altered but
    valid gzip), truncated/ (t10k labels cut in half) and empty/ (every file 404s)."""
    root = tmp_path_factory.mktemp("mirror")
    shutil.copytree(mnist_root, root / "good", ignore=shutil.ignore_patterns("SHA256SUMS*"))
    shutil.copytree(root / "good", root / "flipped")
    labels = bytearray(gzip.decompress((root / "good" / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[8:108] = bytes(9 - b for b in labels[8:108])
    (root / "flipped" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    shutil.copytree(root / "good", root / "truncated")
    cut = root / "truncated" / "t10k-labels-idx1-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (root / "empty").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_lands_verified_files_in_the_cache(mirror):
    folder = mnist_files(mirrors=[mirror + "good/"])
    assert folder == data.mnist_cache_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_SHA256)  # no staging left
    for name, digest in MNIST_SHA256.items():
        assert _sha_of_content(folder / name) == digest
    assert mnist_files(download=False) == folder  # the next run finds the cache


def test_a_404_mirror_is_skipped_for_the_next_one(mirror, monkeypatch):
    monkeypatch.setenv("DGM_MNIST_MIRRORS", f"{mirror}empty/ {mirror}good/")
    folder = mnist_files()
    for name, digest in MNIST_SHA256.items():
        assert _sha_of_content(folder / name) == digest


@pytest.mark.parametrize(
    "variant, name, problem",
    [
        ("flipped", "train-labels-idx1-ubyte.gz", "checksum mismatch"),
        ("truncated", "t10k-labels-idx1-ubyte.gz", "checksum failed: not a valid gzip file"),
    ],
)
def test_a_bad_download_caches_nothing(mirror, variant, name, problem):
    urls = [mirror + "empty/", mirror + variant + "/"]
    with pytest.raises(DataError) as err:
        mnist_files(mirrors=urls)
    message = str(err.value)
    assert f"MNIST file {name}" in message and problem in message
    assert MNIST_SHA256[name] in message  # the expected hash
    assert all(url + name in message for url in urls)  # every URL tried, the 404 included
    assert "Nothing was cached" in message and "DGM_DATA" in message
    cache = data.mnist_cache_dir()
    assert list(cache.rglob("*")) == []  # the three good files were staged, not cached


def test_flipped_download_reports_the_hash_it_got(mirror):
    with pytest.raises(DataError) as err:
        mnist_files(mirrors=[mirror + "flipped/"])
    got = str(err.value).split("decompressed content is ")[1].split(",")[0]
    assert len(got) == 64 and got != MNIST_SHA256["train-labels-idx1-ubyte.gz"]


# --- idx parsing ---------------------------------------------------------------------------------


def test_read_idx_round_trip_and_bad_files(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", array)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), array)
    good = gzip.decompress((tmp_path / "ok.gz").read_bytes())
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x01\x02" + good[2:]))
    with pytest.raises(DataError, match="magic.gz: not an idx file"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(good[:-1]))
    with pytest.raises(DataError, match=r"short.gz: .*shape \(2, 3, 4\).*truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "ok.gz").read_bytes()[:-10])
    with pytest.raises(DataError, match="cut.gz: cannot read it"):
        read_idx(tmp_path / "cut.gz")


# --- binarization ------------------------------------------------------------------------------------


def test_dynamic_epochs_are_fresh_bernoulli_draws_of_the_grey_levels(dynamic):
    assert dynamic.dynamic and dynamic.spec.support == "binary"
    assert dynamic.train.min() >= 0 and dynamic.train.max() <= 1
    assert not ((dynamic.train == 0) | (dynamic.train == 1)).all()  # grey levels kept
    g = torch.Generator().manual_seed(7)
    first, second = dynamic.train_epoch(g), dynamic.train_epoch(g)
    again = dynamic.train_epoch(torch.Generator().manual_seed(7))
    for epoch in (first, second):
        assert ((epoch == 0) | (epoch == 1)).all()
        assert abs(float(epoch.mean() - dynamic.train.mean())) < 0.005
    assert torch.equal(first, again)
    assert (first != second).float().mean() > 0.01  # a new binarization, not a reshuffle


def test_dynamic_val_and_test_are_fixed_seeded_binarizations(dynamic, grey, mnist_root):
    reloaded = load("mnist", root=mnist_root)
    for part, offset in (("test", 1), ("val", 2)):
        x = getattr(dynamic, part)
        assert ((x == 0) | (x == 1)).all()
        assert torch.equal(x, getattr(reloaded, part))
        expected = torch.bernoulli(getattr(grey, part), generator=torch.Generator().manual_seed(offset))
        assert torch.equal(x, expected)  # the documented seed rule: seed + offset
    assert abs(float(dynamic.test.mean() - grey.test.mean())) < 0.005
    other_seed = load("mnist", root=mnist_root, seed=1)
    assert not torch.equal(other_seed.test, dynamic.test)


def test_static_binarization_is_fixed_and_shares_the_test_set(dynamic, grey, mnist_root):
    static = load("mnist", root=mnist_root, binarization="static")
    assert not static.dynamic
    assert ((static.train == 0) | (static.train == 1)).all()
    g = torch.Generator().manual_seed(3)
    assert static.train_epoch(g) is static.train
    assert torch.equal(static.train, load("mnist", root=mnist_root, binarization="static").train)
    assert abs(float(static.train.mean() - grey.train.mean())) < 0.005
    assert torch.equal(static.test, dynamic.test) and torch.equal(static.val, dynamic.val)


def test_no_binarization_keeps_grey_levels(grey, mnist_root):
    assert grey.spec.support == "real" and not grey.dynamic
    pixels = read_idx(mnist_root / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    assert torch.equal(grey.test, torch.from_numpy(pixels).float() / 255)


# --- splits --------------------------------------------------------------------------------------------


def test_iwae_split_val_is_the_tail_of_the_training_file(grey, mnist_root):
    images = read_idx(mnist_root / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    labels = read_idx(mnist_root / "train-labels-idx1-ubyte.gz")
    assert (len(grey.train), len(grey.val), len(grey.test)) == (59_600, 400, 10_000)
    assert torch.equal(grey.val, torch.from_numpy(images[-400:]).float() / 255)
    assert torch.equal(grey.train[-1], torch.from_numpy(images[59_599]).float() / 255)
    assert torch.equal(grey.val_labels, torch.from_numpy(labels[-400:].astype(np.int64)))
    assert grey.train_labels.dtype == torch.int64 and len(grey.test_labels) == 10_000


def test_50k_split(mnist_root):
    ds = load("mnist", root=mnist_root, split="50000/10000", binarization="none")
    images = read_idx(mnist_root / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50_000, 10_000, 10_000)
    assert torch.equal(ds.val, torch.from_numpy(images[50_000:]).float() / 255)


# --- mnist-logit -------------------------------------------------------------------------------------


def test_mnist_logit_inverts_to_the_pixels(mnist_root):
    ds = load("mnist-logit", root=mnist_root)
    lam = ds.info["lam"]
    assert lam == 1e-6 and ds.spec.support == "real" and torch.isfinite(ds.train).all()
    x = ((torch.sigmoid(ds.val.double()) - lam) / (1 - 2 * lam)).clamp(0, 1 - 1e-12)
    pixels = read_idx(mnist_root / "train-images-idx3-ubyte.gz").reshape(-1, 784)[-400:]
    assert torch.equal(torch.floor(256 * x), torch.from_numpy(pixels).double())
    u = torch.rand(400, 784, generator=torch.Generator().manual_seed(2)).double()  # val: seed + 2
    exact = torch.logit(lam + (1 - 2 * lam) * (torch.from_numpy(pixels).double() + u) / 256)
    assert (ds.val.double() - exact).abs().max() < 1e-4  # float32 loses nothing at the extremes


def test_mnist_dequantized_floors_back_to_the_pixels(mnist_root):
    ds = load("mnist-dequantized", root=mnist_root)
    assert ds.spec.support == "real" and ds.info["levels"] == 256
    pixels = read_idx(mnist_root / "train-images-idx3-ubyte.gz").reshape(-1, 784)[-400:]
    assert torch.equal(torch.floor(256 * ds.val.double()), torch.from_numpy(pixels).double())
    u = torch.rand(400, 784, generator=torch.Generator().manual_seed(2))  # val: seed + 2
    assert torch.equal(ds.val, (torch.from_numpy(pixels).float() + u) / 256)


def test_digits_dequantized_floors_back_to_the_levels():
    real, levels = load("digits-dequantized"), load("digits17")
    for part in ("train", "val", "test"):
        x = getattr(real, part)
        assert x.min() >= 0 and x.max() < 1
        assert torch.equal(torch.floor(17 * x.double()), getattr(levels, part).double())
        assert torch.equal(getattr(real, f"{part}_labels"), getattr(levels, f"{part}_labels"))
    assert (17 * real.train - levels.train).std() > 0.25  # the noise is uniform on each cell (std 0.289)


def test_logit_log_jacobian_matches_autograd():
    lam = 1e-6
    x = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.logit(lam + (1 - 2 * lam) * x)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    expected = dydx.log().sum(-1)
    assert torch.allclose(data.logit_log_jacobian(y.detach(), lam), expected, rtol=1e-10)


# --- the embedded subset ---------------------------------------------------------------------------


def test_embedded_needs_no_shared_data_and_is_binary(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DGM_DATA", str(empty))

    def no_files(*args, **kwargs):
        raise AssertionError("mnist-embedded must not look for the MNIST files")

    monkeypatch.setattr("experiments.data.mnist.mnist_files", no_files)
    ds = load("mnist-embedded")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4_500, 500, 1_000)
    assert ds.spec.support == "binary" and not ds.dynamic
    for x in (ds.train, ds.val, ds.test):
        assert x.dtype == torch.float32 and ((x == 0) | (x == 1)).all()
    assert set(ds.train_labels.tolist()) == set(range(10))


def test_embedded_asset_is_what_make_embedded_derives(mnist_root):
    derived = build_subset(mnist_root)
    asset = Path(data.__file__).parent.parent / "assets" / data.EMBEDDED_ASSET
    assert asset.stat().st_size < 1_000_000
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == data.EMBEDDED_SHA256
    assert data.EMBEDDED_SHA256 in (asset.parent / "README.md").read_text()
    with np.load(asset) as shipped:
        assert sorted(shipped.files) == sorted(derived)
        for key, array in derived.items():
            assert shipped[key].dtype == array.dtype and shipped[key].tobytes() == array.tobytes()


def test_embedded_is_a_binarization_of_the_canonical_images(mnist_root):
    ds = load("mnist-embedded")
    grey = read_idx(mnist_root / "train-images-idx3-ubyte.gz")[:5_000].reshape(-1, 784)
    bits = torch.cat([ds.train, ds.val]).numpy()
    assert (bits[grey == 0] == 0).all() and (bits[grey == 255] == 1).all()
    assert abs(bits.mean() - grey.mean() / 255) < 0.005
    labels = read_idx(mnist_root / "t10k-labels-idx1-ubyte.gz")[:1_000]
    assert np.array_equal(ds.test_labels.numpy(), labels)


# --- digits, toys, ppca -------------------------------------------------------------------------------


def test_digits_binary_is_the_thresholded_17_level_variant():
    binary, levels = load("digits"), load("digits17")
    assert levels.spec.support == "categorical" and levels.spec.num_levels == 17
    for part, size in (("train", 1_257), ("val", 180), ("test", 360)):
        b, k = getattr(binary, part), getattr(levels, part)
        assert b.shape == k.shape == (size, 64)
        assert torch.equal(b, (k >= 8).float())
        levels.spec.check(k)
        binary.spec.check(b)
        assert torch.equal(getattr(binary, f"{part}_labels"), getattr(levels, f"{part}_labels"))
    assert set(torch.cat([levels.train, levels.val, levels.test]).unique().tolist()) == set(range(17))


TOYS = ["moons", "rings", "checkerboard", "8gaussians", "spiral"]


@pytest.mark.parametrize("name", TOYS)
def test_toy_sets_are_seeded_2d_samples(name):
    ds = load(name, seed=3)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20_000, 2_000, 2_000)
    for x in (ds.train, ds.val, ds.test):
        assert x.dtype == torch.float32 and x.shape[1:] == (2,) and torch.isfinite(x).all()
        assert x.abs().max() < 5 and x.std(0).min() > 0.3
    assert torch.equal(ds.train, load(name, seed=3).train)
    assert not torch.equal(ds.train, load(name, seed=4).train)


def test_toy_shapes():
    eight = load("8gaussians").train
    angles = torch.arange(8) * (2 * math.pi / 8)
    centers = 2 * torch.stack([angles.cos(), angles.sin()], -1)
    nearest = torch.cdist(eight, centers).min(-1)
    assert nearest.values.max() < 1.2
    assert (torch.bincount(nearest.indices, minlength=8).float() / len(eight) - 1 / 8).abs().max() < 0.02
    radius = load("rings").train.norm(dim=-1)
    assert ((radius * 2).round() - radius * 2).abs().mean() < 0.1  # near 0.5, 1, 1.5 or 2
    board = load("checkerboard").train
    assert (torch.floor(board).sum(-1) % 2 == 0).all()  # only the dark squares


def test_ppca_matches_its_closed_form_covariance():
    ds = load("ppca")
    w = torch.tensor(ds.info["W"], dtype=torch.float64)
    mu = torch.tensor(ds.info["mu"], dtype=torch.float64)
    sigma = ds.info["sigma"]
    assert w.shape == (10, 3) and sigma == 0.5
    x = torch.cat([ds.train, ds.val, ds.test]).double()
    cov = w @ w.T + sigma**2 * torch.eye(10, dtype=torch.float64)
    empirical = torch.cov(x.T)
    assert torch.linalg.norm(empirical - cov) / torch.linalg.norm(cov) < 0.06
    assert (x.mean(0) - mu).abs().max() < 0.15
    noise = torch.linalg.eigvalsh(empirical)[:7]  # the D - q smallest: sigma^2
    assert (noise - sigma**2).abs().max() < 0.04


# --- bad data and bad options --------------------------------------------------------------------------


def test_data_spec_rejects_bad_data_saying_what_it_expected():
    binary = DataSpec((784,), "binary")
    with pytest.raises(DataError, match=r"expected shape \[N, 784\]"):
        binary.check(torch.zeros(5, 28, 28))
    with pytest.raises(DataError, match=r"values in \{0, 1\}"):
        binary.check(torch.full((5, 784), 0.5))
    with pytest.raises(DataError, match="NaN"):
        binary.check(torch.full((5, 784), float("nan")))
    levels = DataSpec((64,), "categorical", num_levels=17)
    with pytest.raises(DataError, match=r"levels 0\.\.16"):
        levels.check(torch.full((5, 64), 17.0))
    with pytest.raises(DataError, match=r"levels 0\.\.16"):
        levels.check(torch.full((5, 64), 2.5))


def test_dataset_refuses_data_its_spec_rejects():
    spec = DataSpec((4,), "binary")
    ok = torch.zeros(3, 4)
    with pytest.raises(DataError, match="toy val"):
        Dataset("toy", spec, ok, torch.full((3, 4), 0.5), ok)
    with pytest.raises(DataError, match="probabilities in"):
        Dataset("toy", spec, torch.full((3, 4), 2.0), ok, ok, dynamic=True)


def test_unknown_names_and_options_list_the_choices():
    with pytest.raises(DataError) as err:
        load("mnits")
    assert all(name in str(err.value) for name in data.DATASETS)
    with pytest.raises(DataError, match="dynamic, static, none"):
        load("digits", binarization="stochastic")
    with pytest.raises(DataError, match="59600/400, 50000/10000"):
        load("digits", split="55000/5000")


# speech is synthesized by espeak-ng (tests/test_wavenet.py covers it where espeak-ng exists)
@pytest.mark.parametrize("name", sorted(set(data.DATASETS) - {"mnist", "mnist-logit", "mnist-dequantized", "speech"}))
def test_every_listed_dataset_loads_and_describes_itself(name):
    ds = load(name)
    line = ds.describe()
    assert "\n" not in line and line.startswith(f"{name}: {len(ds.train)} train")
    assert ds.spec.support in line and "binarization" in line

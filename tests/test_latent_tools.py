"""Latent-space tools: slerp/lerp geometry, encode = the guide's means, decode = the
decoder's mean, PCA projection, PNGs from a trained run, and the errors."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from experiments import latent_tools as lt
from experiments.cli import main
from experiments.config import RunConfig
from experiments.runs import train_run
from inference.config import EvalConfig
from inference.runner import TrainConfig
from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.ppca import PPCA, PPCAConfig
from models.latent.vae import VAE, VAEConfig
from models.latent.vae2 import VAE2, VAE2Config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- geometry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slerp_hits_the_endpoints_and_interpolates_norm_and_angle(float64, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(7, generator=g), 3.0 * torch.randn(7, generator=g)
    t = torch.linspace(0, 1, 11)
    path = lt.slerp(a, b, t)
    torch.testing.assert_close(path[0], a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path[-1], b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.norm(dim=-1), (1 - t) * a.norm() + t * b.norm(), rtol=1e-12, atol=1e-12)
    unit = path / path.norm(dim=-1, keepdim=True)
    omega = torch.arccos((a / a.norm()) @ (b / b.norm()))
    steps = torch.arccos((unit[1:] * unit[:-1]).sum(-1).clamp(-1, 1))  # constant angular speed
    torch.testing.assert_close(steps, torch.full((10,), float(omega) / 10), rtol=1e-6, atol=1e-6)
    # it stays in the plane of a and b: the residual of a least-squares fit on [a, b] is zero
    basis = torch.stack([a, b], 1)
    coef = torch.linalg.lstsq(basis, path.T).solution
    torch.testing.assert_close(basis @ coef, path.T, rtol=1e-10, atol=1e-10)


def test_slerp_of_equal_norms_stays_on_the_sphere_and_parallel_falls_back(float64):
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 3.0]])  # second row: parallel to a's
    t = torch.linspace(0, 1, 5)
    path = lt.slerp(a, b, t)
    torch.testing.assert_close(path[:, 0].norm(dim=-1), torch.full((5,), 2.0))
    torch.testing.assert_close(path[2, 0], torch.tensor([math.sqrt(2.0), math.sqrt(2.0)]))
    torch.testing.assert_close(path[:, 1], lt.lerp(a[1], b[1], t))
    torch.testing.assert_close(lt.lerp(a, b, torch.tensor([0.0, 1.0])), torch.stack([a, b]))


def test_projection_is_the_top_two_principal_components(float64):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(500, 5, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])) + 7.0
    xy = lt.projection(means)
    cov = torch.cov(xy.T)
    eig = torch.linalg.eigvalsh(torch.cov(means.T)).flip(0)
    torch.testing.assert_close(torch.diag(cov), eig[:2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cov[0, 1], torch.tensor(0.0), atol=1e-10, rtol=0)
    two = torch.randn(10, 2, generator=g)
    torch.testing.assert_close(lt.projection(two), two)


# --- encode / decode -----------------------------------------------------------------------------
def _small_vae(spec=DataSpec((6,), "binary")) -> VAE:
    torch.manual_seed(0)
    return VAE(spec, VAEConfig(latent_dim=3, encoder_hidden=(8,), decoder_hidden=(8,))).double()


def test_encode_returns_the_guides_loc_and_decode_the_decoder_mean(float64):
    model = _small_vae()
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    codes = lt.encode(model.guide, x)
    loc = model.encoder(x)[:, :3]
    torch.testing.assert_close(codes["z"], loc)
    torch.testing.assert_close(lt.decode(model, codes), torch.sigmoid(model.decoder(loc)))
    ppca = PPCA(DataSpec((4,), "real"), PPCAConfig(latent_dim=2)).double()
    y = torch.randn(3, 4)
    torch.testing.assert_close(lt.encode(ppca.guide, y)["z"], ppca.encoder(y)[0])


def test_encode_of_a_hierarchical_guide_conditions_on_the_lower_means(float64):
    torch.manual_seed(0)
    model = VAE2(DataSpec((6,), "binary"), VAE2Config(h1_dim=3, h2_dim=2, hidden1=(8,), hidden2=(4,))).double()
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    codes = lt.encode(model.guide, x)
    h1 = model.q_h1(x).mean
    torch.testing.assert_close(codes["h1"], h1)
    torch.testing.assert_close(codes["h2"], model.q_h2(h1).mean)
    torch.testing.assert_close(lt.decode(model, codes), torch.sigmoid(model.decoder(h1)))


def test_interpolation_ends_at_the_reconstructions(float64):
    model = _small_vae()
    x = torch.bernoulli(torch.full((2, 6), 0.5))
    for method in ("slerp", "linear"):
        path = lt.interpolate(model, model.guide, x[0], x[1], steps=5, method=method)
        torch.testing.assert_close(path[[0, -1]], lt.decode(model, lt.encode(model.guide, x)))
    codes = lt.encode(model.guide, x)["z"]
    mid = lt.interpolate(model, model.guide, x[0], x[1], steps=3, method="linear")[1]
    torch.testing.assert_close(mid, torch.sigmoid(model.decoder(codes.mean(0))))
    with pytest.raises(DGMError, match="interpolation"):
        lt.interpolate(model, model.guide, x[0], x[1], method="cubic")


def test_categorical_decode_is_the_expected_level(float64):
    torch.manual_seed(0)
    model = VAE(DataSpec((3,), "categorical", num_levels=4), VAEConfig(latent_dim=2, encoder_hidden=(4,))).double()
    z = torch.randn(5, 2)
    probs = torch.softmax(model.decoder(z).reshape(5, 3, 4), -1)
    torch.testing.assert_close(lt.decode(model, {"z": z}), (probs * torch.arange(4.0)).sum(-1))


class _Discrete(GenerativeModel):
    name = "discrete"

    def __init__(self):
        super().__init__(DataSpec((2,), "binary"))
        self.p = torch.nn.Parameter(torch.zeros(()))

    def model(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            c = pyro.sample("c", dist.Bernoulli(torch.sigmoid(self.p)).expand([x.shape[0]]))
            pyro.sample("x", dist.Bernoulli(c[..., None].expand(x.shape) * 0.5 + 0.25).to_event(1), obs=x)

    def guide(self, x, idx=None, size=None):
        with self.data_plate(x, idx, size):
            pyro.sample("c", dist.Bernoulli(torch.full((x.shape[0],), 0.5)))


def test_models_without_continuous_latents_are_refused():
    x = torch.zeros(3, 2)
    with pytest.raises(DGMError, match="discrete"):
        lt.encode(_Discrete().guide, x)
    with pytest.raises(DGMError, match="no latent"):
        lt.encode(lambda *args: None, x)


# --- PNGs from a run, and the CLI ----------------------------------------------------------------
def _train(tmp_path, model: str, preset: str = "small"):
    train = TrainConfig(epochs=1, max_steps=3, device="cpu", progress=False)
    config = RunConfig.from_flat(model=model, preset=preset, data="digits", train=train, eval=EvalConfig(k=4, limit=10))
    run = tmp_path / model
    train_run(config, run)
    return run


def test_latent_pngs_of_a_trained_run_and_errors(tmp_path, one_thread):
    run = _train(tmp_path, "vae")
    for what in ("interpolate", "project", "reconstruct"):
        out = tmp_path / f"{what}.png"
        assert main(["latent", str(run), "--what", what, "--out", str(out), "--n", "200"]) == 0
        data = out.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert lt.run_latent(run, "project").name == "latent-project.png"  # default path inside the run
    with pytest.raises(DGMError, match="not a run directory"):
        lt.run_latent(tmp_path / "nowhere", "project")
    with pytest.raises(DGMError, match="--what"):
        lt.run_latent(run, "dance")
    assert main(["latent", str(tmp_path / "nowhere")]) == 2  # one line on stderr, no traceback
    fvsbn = _train(tmp_path, "fvsbn", preset=None)
    with pytest.raises(DGMError, match="no latent"):
        lt.run_latent(fvsbn, "project")
    with pytest.raises(DGMError, match="not class-conditional"):
        lt.run_latent(run, "analogies")


def test_class_conditional_runs_draw_analogies_and_style_grids(tmp_path, one_thread):
    run = _train(tmp_path, "cvae")
    for what in ("analogies", "style"):
        out = tmp_path / f"{what}.png"
        assert main(["latent", str(run), "--what", what, "--out", str(out), "--images", "4"]) == 0
        assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(DGMError, match="analogies or style"):
        lt.run_latent(run, "project")

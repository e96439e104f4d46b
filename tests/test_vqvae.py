"""VQ-VAE: the quantizer (nearest code, straight-through gradient, EMA closed form,
perplexity), the exact bound, the auxiliary-loss contract, training through the runner with
checkpointed EMA buffers, and the stage-2 code prior."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from experiments import code_prior
from experiments.config import RunConfig
from experiments.data import Dataset
from experiments.runs import train_run
from inference import ELBO, EvalConfig, TrainConfig
from inference.objectives import IWAE
from models import MODELS
from models.base import DataSpec, DGMError, collect_aux_terms
from models.latent.vqvae import VQVAE, VQVAEConfig
from models.nn.quantize import UniformCodebook, VectorQuantizer, perplexity, straight_through

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC8 = DataSpec((64,), "binary", image_shape=(8, 8))
TINY = VQVAEConfig(num_codes=5, code_dim=3, channels=6, num_res_blocks=1, num_downsamples=1)


def _binary(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 64), 0.3), generator=g)


# --- the quantizer ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,d,grid", [(7, 3, (4, 4)), (32, 8, (2, 5)), (2, 1, (3, 3))])
def test_quantizer_picks_the_nearest_code_by_brute_force(float64, k, d, grid):
    q = VectorQuantizer(k, d, ema=False)
    z_e = torch.randn((6, d) + grid)
    out = q(z_e)
    for b in range(z_e.shape[0]):
        for r in range(grid[0]):
            for c in range(grid[1]):
                dists = [float(((z_e[b, :, r, c] - q.codebook[i].detach()) ** 2).sum()) for i in range(k)]
                assert out.indices[b, r, c] == min(range(k), key=dists.__getitem__)
                assert torch.equal(out.z_q[b, :, r, c], q.codebook[out.indices[b, r, c]].detach())


def test_straight_through_copies_the_gradient_exactly(float64):
    q = VectorQuantizer(6, 4, ema=False)
    z_e = torch.randn(3, 4, 2, 2, requires_grad=True)
    w = torch.randn(3, 4, 2, 2)

    def loss(z):
        return (w * torch.sin(z) * z).sum()

    out = q(z_e)
    loss(out.z_q).backward()
    z_q_leaf = out.z_q.detach().clone().requires_grad_(True)
    loss(z_q_leaf).backward()
    assert torch.equal(z_e.grad, z_q_leaf.grad)
    assert q.codebook.grad is None  # the decoder's gradient never reaches the codes
    # and the output is exactly a codebook member (no z_e + (z_q - z_e) rounding)
    assert torch.equal(out.z_q.detach(), q.lookup(out.indices).detach())
    with pytest.raises(DGMError):
        straight_through(torch.zeros(2, 3), torch.zeros(3, 2))


def test_codebook_gradient_comes_only_from_the_codebook_loss(float64):
    """With ``ema=False`` the codebook is a parameter: the reconstruction (through the
    straight-through copy) and the commitment loss give it no gradient, the codebook loss
    ``||sg(z_e) - e||^2`` gives ``2 sum (e_k - z_e)`` over the cells assigned to ``k``."""
    q = VectorQuantizer(4, 2, ema=False)
    z_e = torch.randn(5, 2, 3, 3, requires_grad=True)
    out = q(z_e)
    (out.z_q**2).sum().backward(retain_graph=True)
    out.commitment.sum().backward(retain_graph=True)
    assert q.codebook.grad is None
    out.codebook_loss.sum().backward()
    flat = z_e.detach().movedim(1, -1).reshape(-1, 2)
    idx = out.indices.reshape(-1)
    expected = torch.stack([2 * (q.codebook.detach()[k] - flat[idx == k]).sum(0) for k in range(4)])
    torch.testing.assert_close(q.codebook.grad, expected)


def test_under_ema_the_codebook_is_a_buffer_that_receives_no_gradient():
    m = VQVAE(SPEC8, TINY)
    assert m.quantizer.codebook.requires_grad is False
    assert all(p is not m.quantizer.codebook for p in m.parameters())
    loss, _ = ELBO().loss_terms(m.model, m.guide, _binary(10))
    loss.backward()
    assert m.quantizer.codebook.grad is None
    assert {"quantizer.codebook", "quantizer.ema_count", "quantizer.ema_sum"} <= set(m.state_dict())


def test_ema_update_equals_the_closed_form(float64):
    """Counts, sums and Laplace-smoothed codes after two EMA steps, by hand."""
    gamma, eps = 0.9, 0.1
    q = VectorQuantizer(3, 2, ema=True, decay=gamma, epsilon=eps)
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q.codebook.copy_(init)
    q.ema_sum.copy_(init)
    # four cells: two near code 0, two near code 1, none near code 2
    z_e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [11.0, 1.0]]).t().reshape(1, 2, 2, 2)
    out = q(z_e, update=True)
    assert out.indices.reshape(-1).tolist() == [0, 0, 1, 1]
    count = [gamma * 1 + (1 - gamma) * 2, gamma * 1 + (1 - gamma) * 2, gamma * 1]
    sums = [
        [gamma * 0 + (1 - gamma) * 1, gamma * 0 + (1 - gamma) * 1],
        [gamma * 10 + (1 - gamma) * 20, gamma * 0 + (1 - gamma) * 2],
        [0.0, gamma * 10],
    ]
    n = sum(count)
    codes = [[s / ((c + eps) / (n + 3 * eps) * n) for s in row] for row, c in zip(sums, count)]
    torch.testing.assert_close(q.ema_count, torch.tensor(count))
    torch.testing.assert_close(q.ema_sum, torch.tensor(sums))
    torch.testing.assert_close(q.codebook, torch.tensor(codes))
    assert torch.equal(out.z_q.detach(), init[out.indices].movedim(-1, 1))  # the pre-update codes
    # a second step accumulates on top
    q(z_e, update=True)
    count2 = [gamma * c + (1 - gamma) * a for c, a in zip(count, [2, 2, 0])]
    torch.testing.assert_close(q.ema_count, torch.tensor(count2))


def test_dead_codes_restart_at_an_encoder_output(float64):
    q = VectorQuantizer(4, 2, ema=True, decay=0.5, dead_code_threshold=0.6)
    init = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, -5.0], [-5.0, 5.0]])
    q.codebook.copy_(init)
    q.ema_sum.copy_(init)
    z_e = 0.1 * torch.randn(3, 2, 2, 2) + 5.0  # every cell goes to code 1; the others' counts decay to 0.5 < 0.6
    out = q(z_e, update=True)
    assert (out.indices == 1).all()
    dead = [0, 2, 3]
    flat = z_e.movedim(1, -1).reshape(-1, 2)
    for k in dead:
        assert q.ema_count[k] == 1.0
        assert any(torch.equal(q.ema_sum[k], row) for row in flat)


def test_perplexity_is_k_for_uniform_use_and_one_for_a_single_code():
    assert perplexity(torch.arange(16).repeat(3), 16).item() == pytest.approx(16.0, rel=1e-6)
    assert perplexity(torch.full((50,), 3), 16).item() == pytest.approx(1.0)
    p = torch.tensor([0.75, 0.25])  # 3:1 use of two codes out of eight
    expected = math.exp(-(p * p.log()).sum().item())
    assert perplexity(torch.tensor([1, 1, 1, 6]), 8).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_codebook_prior_draws_members_and_has_mass_k_to_the_minus_cells(float64):
    codebook = torch.randn(6, 3)
    p = UniformCodebook(codebook, (2, 4)).expand((5,))
    z = p.sample((7,))
    assert z.shape == (7, 5, 3, 2, 4)
    cells = z.movedim(-3, -1).reshape(-1, 3)
    assert ((cells[:, None, :] == codebook[None]).all(-1).sum(-1) == 1).all()
    torch.testing.assert_close(p.log_prob(z), torch.full((7, 5), -8 * math.log(6)))


# --- the bound and the auxiliary losses -------------------------------------------------------
def _hand_elbo(m: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x | e_k(x)) - h w log K with the nearest codes found by brute force and the
    pixel log-likelihoods written out."""
    z_e = m.encode_maps(x)
    flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
    idx = torch.cdist(flat, m.quantizer.codebook).argmin(1).reshape(x.shape[0], *m.grid)
    maps = m.decoder(m.quantizer.codebook[idx].movedim(-1, 1))  # [B, P, 8, 8]: P numbers per pixel
    raw = maps[:, 0].reshape(x.shape[0], -1)
    support = m.data_spec.support
    if support == "binary":
        log_lik = x * torch.nn.functional.logsigmoid(raw) + (1 - x) * torch.nn.functional.logsigmoid(-raw)
    elif support == "categorical":  # pixel (r, c) has the K logits maps[:, :, r, c]
        logits = maps.flatten(2).transpose(1, 2)
        log_lik = logits.log_softmax(-1).gather(-1, x.long()[..., None])[..., 0]
    else:
        sigma = m.likelihood.log_scale.exp()
        log_lik = -0.5 * ((x - raw) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)
    return log_lik.sum(-1) - m.grid[0] * m.grid[1] * math.log(m.config.num_codes)


def _data(support: str, n: int) -> torch.Tensor:
    if support == "binary":
        return _binary(n)
    if support == "categorical":
        return torch.randint(0, 4, (n, 64)).double()
    return torch.randn(n, 64)


@pytest.mark.parametrize("support", ["binary", "categorical", "real"])
def test_the_elbo_is_log_likelihood_minus_cells_log_k(float64, support):
    spec = DataSpec((64,), support, num_levels=4 if support == "categorical" else None, image_shape=(8, 8))
    m = VQVAE(spec, replace(TINY, gaussian_scale=0.7)).double()
    m.eval()
    x = _data(support, 9)
    expected = _hand_elbo(m, x)
    torch.testing.assert_close(ELBO().bound(m.model, m.guide, x), expected)
    # a deterministic guide: every particle is the same, so IWAE_K equals the ELBO
    torch.testing.assert_close(IWAE(4).bound(m.model, m.guide, x), expected)
    _, terms = ELBO().loss_terms(m.model, m.guide, x, train=False)
    torch.testing.assert_close(terms["kl"], torch.tensor(16 * math.log(5)))


def test_the_aux_loss_changes_the_loss_and_gradient_but_not_the_bound(float64):
    x, idx, n = _binary(8), torch.arange(8, 16), 40
    base = VQVAE(SPEC8, replace(TINY, commitment=0.0)).double()
    beta = 0.7
    other = copy.deepcopy(base)
    other.config = replace(TINY, commitment=beta)
    results = []
    for m in (base, other):
        m.eval()  # no EMA step, so both evaluate the same codebook
        loss, terms = ELBO().loss_terms(m.model, m.guide, x, idx, n)
        loss.backward()
        results.append((loss, terms, {k: p.grad.clone() for k, p in m.named_parameters()}))
    (l0, t0, g0), (l1, t1, g1) = results
    assert t0["bound"] == t1["bound"]
    z_e = base.encode_maps(x).detach()
    q = base.quantizer(z_e)
    commitment = ((z_e - q.z_q.detach()) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(l1 - l0, (n / 8) * beta * commitment.sum())
    torch.testing.assert_close(t1["aux/commitment"], beta * commitment.mean())
    for name in g0:  # the commitment loss moves the encoder only
        same = torch.equal(g0[name], g1[name])
        assert same == (not name.startswith("encoder")), name


def test_ema_steps_happen_only_in_training_steps(float64):
    """One EMA step per training step (not in the objective's structure probe), none with
    ``train=False``, none in eval mode; outside any objective, training mode updates."""
    m = VQVAE(SPEC8, TINY).double()
    x = _binary(10)
    expected = copy.deepcopy(m.quantizer)
    expected(m.encode_maps(x).detach(), update=True)
    objective = ELBO()  # guesses its plates on the first call: that probe must not update
    objective.loss_terms(m.model, m.guide, x)
    torch.testing.assert_close(m.quantizer.ema_count, expected.ema_count)
    torch.testing.assert_close(m.quantizer.codebook, expected.codebook)
    state = copy.deepcopy(m.quantizer.state_dict())
    objective.loss_terms(m.model, m.guide, x, train=False)
    assert all(torch.equal(state[k], v) for k, v in m.quantizer.state_dict().items())
    m.eval()
    ELBO().loss_terms(m.model, m.guide, x)
    m.encode(x)
    assert all(torch.equal(state[k], v) for k, v in m.quantizer.state_dict().items())
    m.train()
    with collect_aux_terms(train=True) as extra:
        m.guide(x)
    assert set(extra.losses) == {"commitment"} and extra.losses["commitment"].shape == (10,)
    assert not torch.equal(m.quantizer.ema_count, state["ema_count"])


def test_the_codebook_loss_variant_trains_the_codebook_by_gradient():
    m = VQVAE(SPEC8, replace(TINY, ema=False))
    assert any(p is m.quantizer.codebook for p in m.parameters())
    loss, terms = ELBO().loss_terms(m.model, m.guide, _binary(10))
    assert {"aux/commitment", "aux/codebook", "perplexity"} <= set(terms)
    loss.backward()
    assert m.quantizer.codebook.grad is not None and m.quantizer.codebook.grad.abs().sum() > 0


def test_bad_configurations_raise():
    with pytest.raises(DGMError, match="divisible"):
        VQVAE(DataSpec((36,), "binary", image_shape=(6, 6)), replace(TINY, num_downsamples=2))
    with pytest.raises(DGMError, match="raster|single-channel"):
        VQVAE(DataSpec((10,), "binary"), TINY)
    with pytest.raises(DGMError):
        VectorQuantizer(1, 4)
    assert MODELS["vqvae"] is VQVAE and set(VQVAE.presets) >= {"small", "paper"}


# --- training through the runner --------------------------------------------------------------
def test_training_reduces_reconstruction_error_and_checkpoints_carry_the_ema_buffers(tmp_path):
    config = RunConfig.from_flat(
        model="vqvae",
        preset="small",
        data="mnist-embedded",
        train=TrainConfig(epochs=1, max_steps=60, batch_size=50, lr=3e-3, log_every=10, progress=False),
        eval=EvalConfig(k=1, limit=100),
    )
    summary = train_run(config, tmp_path / "run")
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["recon"] < 0.7 * train[0]["recon"]
    assert all("perplexity" in r and 1.0 <= r["perplexity"] <= 8.0 for r in train)
    assert all(r["bound"] == pytest.approx(-r["recon"] - 49 * math.log(8), rel=1e-6) for r in train)
    # the reported NLL is -ELBO: the guide is deterministic, so IS with any K gives the ELBO
    assert summary["test"]["nll"] == pytest.approx(-summary["test"]["elbo"], rel=1e-6)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    fresh = VQVAE(DataSpec((784,), "binary", image_shape=(28, 28)), VQVAE.presets["small"])
    assert not torch.equal(fresh.quantizer.ema_count, state["quantizer.ema_count"])
    fresh.load_state_dict(state)
    for key in ("codebook", "ema_count", "ema_sum"):
        assert torch.equal(getattr(fresh.quantizer, key), state[f"quantizer.{key}"])


# --- stage 2 ------------------------------------------------------------------------------------
def test_code_prior_dataset_and_bound(tmp_path):
    config = RunConfig.from_flat(
        model="vqvae",
        preset="small",
        data="mnist-embedded",
        train=TrainConfig(epochs=1, max_steps=10, progress=False),
        eval=EvalConfig(k=1, limit=50),
    )
    run = tmp_path / "vq"
    train_run(config, run)
    train = TrainConfig(epochs=1, max_steps=5, progress=False)
    summary = code_prior.fit_prior(run, prior="pixelcnn", preset="small", train=train)

    from experiments.runs import load_run

    vq_run = load_run(run)
    vqvae, data = vq_run.model, vq_run.data
    codes = code_prior.code_dataset(vqvae, data)
    assert isinstance(codes, Dataset)
    assert codes.spec == DataSpec((49,), "categorical", num_levels=8, image_shape=(7, 7))
    assert codes.test.shape == (len(data.test), 49)
    assert torch.equal(codes.test.reshape(-1, 7, 7).long(), vqvae.eval().encode(data.test))

    prior_dir = run / "prior-pixelcnn-small"
    prior = MODELS["pixelcnn"](codes.spec, MODELS["pixelcnn"].presets["small"])
    prior.load_state_dict(torch.load(prior_dir / "checkpoint.pt", weights_only=False)["model"])
    prior.eval()
    with torch.no_grad():
        x, grids = data.test, codes.test
        recon = -vqvae.log_likelihood(x, grids.long().reshape(-1, 7, 7))
        by_hand = (recon - prior.log_prob(grids)).double().mean().item()
        uniform = (recon + 49 * math.log(8)).double().mean().item()
    assert summary["test"]["bound"]["mean"] == pytest.approx(by_hand, rel=1e-5)
    assert summary["test"]["uniform"]["mean"] == pytest.approx(uniform, rel=1e-5)
    prior_part = summary["test"]["bound"]["mean"] - summary["test"]["recon"]["mean"]
    assert summary["prior_code_nll"] == pytest.approx(prior_part, rel=1e-4)
    assert (prior_dir / "samples.png").exists()
    with pytest.raises(DGMError, match="another configuration"):
        code_prior.fit_prior(run, prior="pixelcnn", preset="small", train=replace(train, lr=0.5))
    from experiments.cli import main

    args = ["fit-prior", str(run), "--prior", "pixelcnn", "--preset", "small", "--epochs", "1", "--max-steps", "5"]
    assert main(args + ["--no-progress"]) == 0  # the same configuration: resumes the finished prior
    assert main(["fit-prior", str(tmp_path / "nowhere")]) == 2  # one line, no traceback


def test_objectives_that_would_drop_the_straight_through_gradient_or_the_commitment_are_refused():
    from experiments.runs import build

    for objective in ("elbo-sf", "elbo-enum", "em"):
        config = RunConfig.from_flat(model="vqvae", preset="small", data="mnist-embedded", objective=objective)
        with pytest.raises(DGMError, match="trains correctly only with --objective elbo or iwae"):
            build(config)

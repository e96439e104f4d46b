"""Cost of one training step of our objectives against the same math in raw PyTorch.

Model: the suite's ``VAE`` with the ``mlp-400-20`` preset (784-400-20 ReLU MLPs both ways,
Bernoulli pixels), batch 128 of random binary data, dataset size N = 60,000 (minibatch
scale N / B), Adam lr 1e-3 (eps 1e-4, the runner's default).

Contenders, each with its own copy of the same initial weights and its own optimizer:

* ``raw``: a hand-written step of the same estimator on the same ``encoder``/``decoder``
  modules: ``(loc, softplus + 1e-4) = encoder(x)``, ``z = loc + scale * eps``,
  ``log w = log Bern(x | decoder(z)) + log N(z; 0, I) - log N(z; loc, scale)``,
  ``loss = -(N / B) * sum_b bound_b``, backward, Adam step.
* ``ours``: the runner's step, ``objective.loss_terms(model.model, guide, x, idx, N)``,
  ``zero_grad(set_to_none=True)``, ``backward``, ``step`` (the runner's metric sums,
  a few scalar adds per step, are left out of every contender).
* ``pyro``: ``pyro.infer.SVI`` with Pyro's own ELBO on ``model.svi_pair()``; a reference.

Before timing, each raw/ours pair is checked to compute the same loss and the same
gradients from the same random seed (``check_same``), which is what makes the ratio a
measure of overhead and not of different arithmetic; Pyro's loss is checked to have the
same value too (its score-function gradients differ: its baseline is per datapoint).

Three comparisons: ELBO (K = 1), IWAE (K = 50, vectorized over ``[K, B, L]``) and the
score-function ELBO with a decaying-average baseline (Pyro reference: ``TraceGraph_ELBO``
with ``use_decaying_avg_baseline`` on a guide whose site is made non-reparameterized).

Diagnostics (``elbo``, ``iwae`` or ``sf``): ``python -m benchmarks.svi_step --profile elbo``
runs cProfile on 200 steps of ours and of raw and prints the top functions in ms per step;
``--breakdown elbo`` times the layers of our forward pass interleaved (network alone, raw
loss, Pyro's traces, ``compute_log_weights``, ``loss_terms``, plus backward).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import math
import pstats
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import pyro
import pyro.infer
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from benchmarks.common import Row, Target, format_table, interleaved, print_profile, set_threads, time_rows
from benchmarks.raw import build_vae, raw_log_weights
from inference.guides import build_guide
from inference.logweights import PARTICLE_PLATE, compute_log_weights
from inference.objectives import ELBO, IWAE, LogWeightObjective, ScoreFunctionELBO
from models.latent.vae import VAE

TARGETS = {"elbo": 1.15, "iwae": 1.15, "sf": 1.5}


@dataclass
class SVIConfig:
    batch: int = 128
    dataset_size: int = 60_000
    num_batches: int = 8  # distinct minibatches cycled through
    lr: float = 1e-3
    adam_eps: float = 1e-4  # the runner's TrainConfig default
    iwae_k: int = 50
    sf_decay: float = 0.9
    rounds: int = 15  # ELBO and score-function comparisons
    steps: int = 20  # per block, ELBO and score-function steps
    iwae_rounds: int = 9
    iwae_steps: int = 3  # per block, IWAE steps (each is ~50 decoder passes)
    warmup: int = 5
    seed: int = 0

    @classmethod
    def quick(cls) -> "SVIConfig":
        return cls(rounds=7, steps=10, iwae_rounds=4, iwae_steps=2, warmup=3)


# --- data and model -----------------------------------------------------------------------


def make_batches(cfg: SVIConfig) -> List[Tuple[Tensor, Tensor]]:
    """``num_batches`` minibatches ``(x [B, 784] in {0, 1}, idx [B] dataset indices)``."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    out = []
    for _ in range(cfg.num_batches):
        x = (torch.rand(cfg.batch, 784, generator=g) < 0.5).float()
        idx = torch.randperm(cfg.dataset_size, generator=g)[: cfg.batch]
        out.append((x, idx))
    return out


def adam(model: VAE, cfg: SVIConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, eps=cfg.adam_eps)


# --- raw PyTorch ----------------------------------------------------------------------------


class RawELBO:
    def __init__(self, model: VAE, n: int):
        self.model, self.n = model, n

    def loss(self, x: Tensor, idx: Tensor) -> Tensor:
        log_w, _ = raw_log_weights(self.model, x, None)
        return -(self.n / x.shape[0]) * log_w.sum()


class RawIWAE:
    def __init__(self, model: VAE, n: int, k: int):
        self.model, self.n, self.k = model, n, k

    def loss(self, x: Tensor, idx: Tensor) -> Tensor:
        log_w, _ = raw_log_weights(self.model, x, self.k)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)
        return -(self.n / x.shape[0]) * bound.sum()


class RawScoreFunctionELBO:
    """``surrogate = log w + (log w.detach() - b) * log q(z)`` with ``z`` detached and
    ``b`` a decaying average of earlier batches' mean learning signal (none on the first
    step), minus the direct gradient
    of ``-log q`` (zero in expectation); written so that the surrogate's value is ``log w``."""

    def __init__(self, model: VAE, n: int, decay: float):
        self.model, self.n, self.decay = model, n, decay
        self.average: Optional[Tensor] = None

    def loss(self, x: Tensor, idx: Tensor) -> Tensor:
        log_w, log_q = raw_log_weights(self.model, x, None, detach_z=True)
        signal = log_w.detach()
        mean = signal.mean()
        if self.average is None:  # no baseline on the first step (not the batch's own mean), as ours
            self.average = mean.clone()
        else:
            signal = signal - self.average
            self.average = self.decay * self.average + (1 - self.decay) * mean
        sf = signal * log_q
        # E_q[grad log q(z)] = 0 for the ELBO: the direct gradient of -log q is dropped,
        # as TraceGraph_ELBO and our ELBO.reduce do
        surrogate = log_w + (log_q - log_q.detach()) + (sf - sf.detach())
        return -(self.n / x.shape[0]) * surrogate.sum()


# --- contenders ------------------------------------------------------------------------------


class Batches:
    def __init__(self, batches: List[Tuple[Tensor, Tensor]]):
        self.batches, self.i = batches, 0

    def next(self) -> Tuple[Tensor, Tensor]:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def raw_step(loss_fn: Callable[[Tensor, Tensor], Tensor], opt: torch.optim.Optimizer, data: Batches):
    def step():
        x, idx = data.next()
        loss = loss_fn(x, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ours_step(objective: LogWeightObjective, model: VAE, opt: torch.optim.Optimizer, data: Batches, n: int):
    """The runner's training step (``inference.runner.Runner.fit``), without its metric sums."""
    guide = build_guide("amortized", model, data.batches[0][0])

    def step():
        x, idx = data.next()
        loss, terms = objective.loss_terms(model.model, guide, x, idx, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class _ScoreFunctionSites(Messenger):
    """Make every latent site non-reparameterized and give it Pyro's decaying-average
    baseline, so ``TraceGraph_ELBO`` uses the same estimator as ``ScoreFunctionELBO``."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        fn = msg["fn"]
        while isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        fn.has_rsample_(False)
        msg["infer"] = {**msg["infer"], "baseline": {"use_decaying_avg_baseline": True, "baseline_beta": self.beta}}


def pyro_svi(model: VAE, elbo: pyro.infer.ELBO, cfg: SVIConfig, guide_wrapper=None) -> pyro.infer.SVI:
    pyro.clear_param_store()
    m, g = model.svi_pair()
    if guide_wrapper is not None:
        g = guide_wrapper(g)
    return pyro.infer.SVI(m, g, pyro.optim.Adam({"lr": cfg.lr, "eps": cfg.adam_eps}), elbo)


def pyro_step(svi: pyro.infer.SVI, data: Batches, n: int):
    def step():
        x, idx = data.next()
        svi.step(x, idx, n)

    return step


# --- fairness check --------------------------------------------------------------------------


def check_same(
    name: str,
    raw_loss: Callable,
    ours_loss: Callable,
    raw_model: VAE,
    ours_model: VAE,
    x: Tensor,
    idx: Tensor,
    seed: int,
) -> str:
    """Assert raw and ours give the same loss and gradients from the same seed."""
    results = []
    for fn, model in ((raw_loss, raw_model), (ours_loss, ours_model)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = fn(x, idx)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads))
    (lr, gr), (lo, go) = results
    if not torch.allclose(lr, lo, rtol=1e-5, atol=1e-3):
        raise AssertionError(f"{name}: raw loss {lr.item():.6f} != ours {lo.item():.6f}; the comparison is not fair")
    worst = 0.0
    for a, b in zip(gr, go):
        rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
    if worst > 1e-3:
        raise AssertionError(f"{name}: raw and ours gradients differ (max relative norm diff {worst:.2e})")
    return (
        f"{name}: same seed -> raw loss {lr.item():.4f}, ours {lo.item():.4f} (rel diff "
        f"{abs((lr - lo) / lo).item():.1e}); gradients agree to {worst:.1e} (relative norm)"
    )


def check_pyro(name: str, svi: pyro.infer.SVI, ours_loss: Callable, x: Tensor, idx: Tensor, n: int, seed: int) -> str:
    torch.manual_seed(seed)
    with torch.no_grad():
        a = ours_loss(x, idx).item()
    torch.manual_seed(seed)
    b = svi.evaluate_loss(x, idx, n)
    if not math.isclose(a, b, rel_tol=1e-5):
        raise AssertionError(f"{name}: Pyro's loss {b:.6f} != ours {a:.6f} from the same seed")
    return f"{name}: same seed -> pyro loss {b:.4f} (same as ours)"


# --- the three comparisons --------------------------------------------------------------------


def _ours_loss(objective: LogWeightObjective, model: VAE, n: int):
    return lambda x, idx: objective.loss_terms(model.model, model.guide, x, idx, n)[0]


def bench_elbo(cfg: SVIConfig, base: VAE, batches, log) -> List[Row]:
    n = cfg.dataset_size
    raw_m, ours_m, pyro_m = (copy.deepcopy(base) for _ in range(3))
    raw, ours = RawELBO(raw_m, n), ELBO(1)
    x, idx = batches[0]
    log(check_same("elbo", raw.loss, _ours_loss(ours, ours_m, n), raw_m, ours_m, x, idx, cfg.seed + 7))
    svi = pyro_svi(pyro_m, pyro.infer.Trace_ELBO(), cfg)
    log(check_pyro("elbo", svi, _ours_loss(ELBO(1), ours_m, n), x, idx, n, cfg.seed + 7))
    return _against_raw_and_pyro("svi ELBO K=1", "elbo", "Trace_ELBO", cfg, batches, n, raw, raw_m, ours, ours_m, svi)


def bench_iwae(cfg: SVIConfig, base: VAE, batches, log) -> List[Row]:
    n, k = cfg.dataset_size, cfg.iwae_k
    raw_m, ours_m = (copy.deepcopy(base) for _ in range(2))
    raw, ours = RawIWAE(raw_m, n, k), IWAE(k)
    x, idx = batches[0]
    log(check_same(f"iwae K={k}", raw.loss, _ours_loss(ours, ours_m, n), raw_m, ours_m, x, idx, cfg.seed + 7))
    contenders = {
        "raw": raw_step(raw.loss, adam(raw_m, cfg), Batches(batches)),
        "ours": ours_step(ours, ours_m, adam(ours_m, cfg), Batches(batches), n),
    }
    t = interleaved(contenders, rounds=cfg.iwae_rounds, steps=cfg.iwae_steps, warmup=max(1, cfg.warmup // 2))
    return time_rows(f"svi IWAE K={k}", t, targets={"ours": Target("<=", TARGETS["iwae"])})


def bench_sf(cfg: SVIConfig, base: VAE, batches, log) -> List[Row]:
    n = cfg.dataset_size
    raw_m, ours_m, pyro_m = (copy.deepcopy(base) for _ in range(3))
    x, idx = batches[0]
    # the check advances the baselines' averages; fresh objectives are timed
    log(
        check_same(
            "elbo-sf",
            RawScoreFunctionELBO(raw_m, n, cfg.sf_decay).loss,
            _ours_loss(ScoreFunctionELBO(1, decay=cfg.sf_decay), ours_m, n),
            raw_m,
            ours_m,
            x,
            idx,
            cfg.seed + 7,
        )
    )
    raw, ours = RawScoreFunctionELBO(raw_m, n, cfg.sf_decay), ScoreFunctionELBO(1, decay=cfg.sf_decay)
    svi = pyro_svi(pyro_m, pyro.infer.TraceGraph_ELBO(), cfg, guide_wrapper=_ScoreFunctionSites(cfg.sf_decay))
    log(check_pyro("elbo-sf", svi, _ours_loss(ScoreFunctionELBO(1), ours_m, n), x, idx, n, cfg.seed + 7))
    return _against_raw_and_pyro(
        "svi ELBO-SF K=1", "sf", "TraceGraph_ELBO", cfg, batches, n, raw, raw_m, ours, ours_m, svi
    )


def _against_raw_and_pyro(label, target, pyro_name, cfg, batches, n, raw, raw_m, ours, ours_m, svi) -> List[Row]:
    """Time raw, ours and Pyro's SVI step interleaved; ratios against raw."""
    contenders = {
        "raw": raw_step(raw.loss, adam(raw_m, cfg), Batches(batches)),
        "ours": ours_step(ours, ours_m, adam(ours_m, cfg), Batches(batches), n),
        "pyro": pyro_step(svi, Batches(batches), n),
    }
    t = interleaved(contenders, rounds=cfg.rounds, steps=cfg.steps, warmup=cfg.warmup)
    return time_rows(
        label,
        t,
        targets={"ours": Target("<=", TARGETS[target])},
        notes={"pyro": f"reference: pyro.infer.SVI + {pyro_name}"},
    )


def run(cfg: SVIConfig, log=print) -> List[Row]:
    base = build_vae(cfg.seed)
    batches = make_batches(cfg)
    log(
        f"svi_step: VAE mlp-400-20, batch {cfg.batch}, N = {cfg.dataset_size}; per contender {cfg.rounds} rounds x "
        f"{cfg.steps} steps (IWAE: {cfg.iwae_rounds} x {cfg.iwae_steps}), warm-up {cfg.warmup}"
    )
    rows = []
    rows += bench_elbo(cfg, base, batches, log)
    rows += bench_iwae(cfg, base, batches, log)
    rows += bench_sf(cfg, base, batches, log)
    return rows


# --- profiling --------------------------------------------------------------------------------


def _pair(which: str, cfg: SVIConfig, base: VAE):
    n = cfg.dataset_size
    ours_m, raw_m = copy.deepcopy(base), copy.deepcopy(base)
    objective, raw = {
        "elbo": (ELBO(1), RawELBO(raw_m, n)),
        "iwae": (IWAE(cfg.iwae_k), RawIWAE(raw_m, n, cfg.iwae_k)),
        "sf": (ScoreFunctionELBO(1, decay=cfg.sf_decay), RawScoreFunctionELBO(raw_m, n, cfg.sf_decay)),
    }[which]
    return objective, ours_m, raw, raw_m


def profile(which: str, cfg: SVIConfig, steps: int = 200, top: int = 25) -> None:
    """cProfile ``steps`` of our step and of the raw step; print the top functions in ms/step."""
    n = cfg.dataset_size
    batches = make_batches(cfg)
    objective, ours_m, raw, raw_m = _pair(which, cfg, build_vae(cfg.seed))
    for name, step in (
        ("ours", ours_step(objective, ours_m, adam(ours_m, cfg), Batches(batches), n)),
        ("raw", raw_step(raw.loss, adam(raw_m, cfg), Batches(batches))),
    ):
        for _ in range(cfg.warmup):
            step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        print_profile(pstats.Stats(prof), steps, "step", f"{which} {name}", top)


def breakdown(which: str, cfg: SVIConfig, rounds: int = 9, steps: int = 50) -> None:
    """Where our step's extra time goes, layer by layer, timed interleaved (no profiler):
    the network alone, the raw loss, Pyro's traces of guide and replayed model (without,
    then with, the particle plate), ``compute_log_weights``, ``loss_terms``; then forward
    plus backward of both losses, and the whole step."""
    n = cfg.dataset_size
    batches = make_batches(cfg)
    base = build_vae(cfg.seed)
    objective, ours_m, raw, raw_m = _pair(which, cfg, base)
    m = ours_m
    x, idx = batches[0]
    k = cfg.iwae_k if which == "iwae" else 1
    sf = which == "sf"
    objective.loss_terms(m.model, m.guide, x, idx, n)  # settles the plate count
    plates = objective.model_plates

    def particles(fn):
        return pyro.plate(PARTICLE_PLATE, k, dim=-(plates + 1))(fn)

    def network():
        loc, raw_scale = m.encoder(x).chunk(2, dim=-1)
        scale = torch.nn.functional.softplus(raw_scale) + m.config.min_posterior_scale
        z = loc + torch.empty((k,) + tuple(loc.shape)).normal_() * scale
        return m.decoder(z.detach() if sf else z)

    def traces(with_particles: bool):
        g = particles(m.guide) if with_particles else m.guide
        md = particles(m.model) if with_particles else m.model
        guide_trace = poutine.trace(g).get_trace(x, idx, n)
        return prune_subsample_sites(poutine.trace(poutine.replay(md, trace=guide_trace)).get_trace(x, idx, n))

    def ours_fwd():
        return objective.loss_terms(m.model, m.guide, x, idx, n)[0]

    def raw_fwd():
        return raw.loss(x, idx)

    def fwd_bwd(loss_fn, model):
        def go():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()

        return go

    raw.model = m  # the same weights for every layer
    layers = {
        "network only (encoder, rsample, decoder)": network,
        "raw loss (network + log-densities)": raw_fwd,
        "Pyro traces: guide + replayed model": lambda: traces(False),
        "  ... under the particle plate, pruned": lambda: traces(True),
        "compute_log_weights": lambda: compute_log_weights(
            m.model, m.guide, (x, idx, n), num_particles=k, max_plate_nesting=plates, force_score_function=sf
        ),
        "ours loss_terms": ours_fwd,
        "raw loss + backward": fwd_bwd(raw_fwd, m),
        "ours loss_terms + backward": fwd_bwd(ours_fwd, m),
    }
    steps_per = steps if which != "iwae" else max(2, steps // 20)
    t = interleaved(layers, rounds=rounds, steps=steps_per, warmup=3)
    print(f"\n=== {which}: forward layers, interleaved, {rounds} rounds x {steps_per} calls (median [min-max]) ===")
    for name, v in t.items():
        print(f"{statistics.median(v) * 1e3:9.3f} ms  [{min(v) * 1e3:.3f}-{max(v) * 1e3:.3f}]  {name}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", choices=("elbo", "iwae", "sf"), default=None)
    p.add_argument("--profile-steps", type=int, default=200)
    p.add_argument("--breakdown", choices=("elbo", "iwae", "sf"), default=None)
    args = p.parse_args(argv)
    intra, inter = set_threads(args.threads)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads: intra-op {intra}, inter-op {inter}")
    cfg = SVIConfig.quick() if args.quick else SVIConfig()
    if args.profile:
        profile(args.profile, cfg, steps=args.profile_steps)
        return 0
    if args.breakdown:
        breakdown(args.breakdown, cfg)
        return 0
    print(format_table(run(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

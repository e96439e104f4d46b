"""NADE's training step: the fused tied-weight layer against the formulation it replaced.

Model: ``NADE`` on ``D = 784`` binary pixels with ``H = 500`` hidden units (the ``mnist``
preset), random init, batch ``B = 100`` of random binary data, Adam lr 1e-3 (eps 1e-4), the
runner's step (``ELBO(1).loss_terms`` on the model's Pyro program, which for an exact model is
``-log p(x)``; backward; Adam step).

Contenders, each with its own copy of the same initial weights and its own optimizer:

* ``reference``: :class:`ReferenceNADE`, the conditionals as they were computed before
  (``reference_logits``): ``einsum`` for the contributions ``W_{:, j} e(x_j)``, an exclusive
  ``cumsum`` over the dimension axis (a slice and a ``cat`` with zeros), ``sigmoid``, and a
  second ``einsum`` for the logits, all differentiated by autograd. Its backward flips the
  cumsum, fills zero slice gradients and materializes ``[B, D, H]`` tensors at each op.
* ``ours``: ``models.autoregressive.nade.NADE`` as registered (``TiedSigmoidLayer``: one
  ``[D, B, H]`` tensor kept by the forward pass, one made by the backward pass).

Before timing, both are checked on the same weights and data to give the same log p(x) and the
same parameter gradients: in float64 on a small model to 1e-10 (asserted), and at the benchmark
size in float32 (printed; asserted to 1e-4 relative).

Measured in one process: **CPU time per step** (``time.process_time``, user + system: a fresh
``[B, D, H]`` tensor of 157 MB costs its page faults in the kernel, which wall time on a loaded
machine would blur), timed interleaved (``common.interleaved``); **bytes allocated per step**,
the sum of every operator's positive self allocation under ``torch.profiler`` with
``profile_memory=True`` over one step after the warm-up (printed as multiples of one ``[B, D, H]``
tensor); and the minor page faults per step over the timed blocks (``getrusage``). Targets: CPU
time and bytes allocated at most a third of the reference's.

``python -m benchmarks --only nade`` (or ``python -m benchmarks.nade [--quick]``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pyro
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import PageFaults, Row, Target, format_table, interleaved, set_threads, time_rows
from inference.objectives import ELBO
from models.autoregressive.nade import NADE, NADEConfig
from models.base import DataSpec

TARGET = 1 / 3  # ours / reference, CPU time per step and bytes allocated per step, at most


@dataclass
class NADEBenchConfig:
    batch: int = 100
    dim: int = 784
    hidden: int = 500
    rounds: int = 6
    steps: int = 2  # per block (a reference step is ~0.6-1.2 CPU-s here)
    warmup: int = 1
    lr: float = 1e-3
    adam_eps: float = 1e-4
    check_batch: int = 16  # the float64 check
    check_dim: int = 30
    check_hidden: int = 9
    seed: int = 0

    @classmethod
    def quick(cls) -> "NADEBenchConfig":
        return cls(rounds=3, steps=1)


def reference_logits(model: NADE, features: Tensor) -> Tensor:
    """``[B, D, K]`` logits as ``NADE.conditional_logits`` computed them before ``TiedSigmoidLayer``."""
    contrib = torch.einsum("bdk,dkh->bdh", features, model._input_weights())  # W_{:, j} e(x_j)
    before = torch.cumsum(contrib[:, :-1], dim=1)
    a = model.c + torch.cat([torch.zeros_like(contrib[:, :1]), before], dim=1)
    return torch.einsum("bdh,dkh->bdk", torch.sigmoid(a), model._output_weights()) + model._output_bias()


class ReferenceNADE(NADE):
    """NADE with the reference formulation of its conditionals (not registered)."""

    def conditional_logits(self, features: Tensor) -> Tensor:
        return reference_logits(self, features)


def reference_copy(model: NADE) -> ReferenceNADE:
    """A ``ReferenceNADE`` holding a copy of ``model``'s weights."""
    ref = ReferenceNADE(model.data_spec, copy.deepcopy(model.config)).to(model.c)
    ref.load_state_dict(model.state_dict())
    return ref


def log_px_and_grads(model: NADE, x: Tensor):
    """``log p(x)`` per datapoint and the gradients of its sum, by parameter name."""
    model.zero_grad(set_to_none=True)
    lp = model.log_prob(x)
    lp.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


def compare(model: NADE, x: Tensor) -> Dict[str, float]:
    """Max abs difference of log p(x) and max relative norm difference of the gradients,
    ``model`` against its reference copy."""
    lp, grads = log_px_and_grads(model, x)
    lp_ref, grads_ref = log_px_and_grads(reference_copy(model), x)
    worst = max(((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in grads_ref.items())
    return {"log_px": (lp - lp_ref).abs().max().item(), "grad": worst, "mean_log_px": lp.mean().item()}


def build(cfg: NADEBenchConfig, dim: int, hidden: int, dtype=torch.float32) -> NADE:
    torch.manual_seed(cfg.seed)
    model = NADE(DataSpec((dim,), "binary"), NADEConfig(hidden=hidden)).to(dtype)
    with torch.no_grad():  # away from the initial zeros of b and c, so every term matters
        model.b.normal_(0, 0.5)
        model.c.normal_(0, 0.5)
    return model


def make_data(batch: int, dim: int, seed: int, dtype=torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(batch, dim, generator=g) < 0.3).to(dtype)


def check_same(cfg: NADEBenchConfig, log) -> None:
    small = build(cfg, cfg.check_dim, cfg.check_hidden, torch.float64)
    d64 = compare(small, make_data(cfg.check_batch, cfg.check_dim, cfg.seed, torch.float64))
    if d64["log_px"] > 1e-10 or d64["grad"] > 1e-10:
        raise AssertionError(f"nade: ours and the reference differ in float64: {d64}")
    model = build(cfg, cfg.dim, cfg.hidden)
    d32 = compare(model, make_data(cfg.batch, cfg.dim, cfg.seed))
    if d32["grad"] > 1e-4 or d32["log_px"] > 1e-4 * abs(d32["mean_log_px"]):
        raise AssertionError(f"nade: ours and the reference differ in float32: {d32}")
    log(
        f"nade: same weights -> float64 (B = {cfg.check_batch}, D = {cfg.check_dim}, H = {cfg.check_hidden}): "
        f"log p(x) within {d64['log_px']:.1e} nats, gradients within {d64['grad']:.1e} (relative norm); "
        f"float32 at the benchmark size: {d32['log_px']:.1e} nats (mean log p(x) {d32['mean_log_px']:.1f}), "
        f"gradients {d32['grad']:.1e}"
    )


def train_step(model: NADE, cfg: NADEBenchConfig, x: Tensor) -> Callable[[], None]:
    """The runner's step for an exact model: ``ELBO(1).loss_terms`` (``-log p(x)`` through the
    Pyro program), backward, Adam."""
    objective = ELBO(1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    guide = model.guide
    idx = torch.arange(x.shape[0])
    n = x.shape[0]

    def step():
        loss, _ = objective.loss_terms(model.model, guide, x, idx, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bytes_allocated(step: Callable[[], None]) -> int:
    """Bytes allocated by one ``step()``: the sum of each operator's positive self allocation
    under ``torch.profiler`` (``profile_memory=True``)."""
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's start/stop lines and allocator warnings come
    from C++, past ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run(cfg: NADEBenchConfig, log=print) -> List[Row]:
    check_same(cfg, log)
    ours_m = build(cfg, cfg.dim, cfg.hidden)
    ref_m = reference_copy(ours_m)
    x = make_data(cfg.batch, cfg.dim, cfg.seed)
    contenders = {"reference": train_step(ref_m, cfg, x), "ours": train_step(ours_m, cfg, x)}
    for step in contenders.values():  # warm-up, then one profiled step each
        step()
    tensor_bytes = cfg.batch * cfg.dim * cfg.hidden * x.element_size()
    alloc = {name: bytes_allocated(step) for name, step in contenders.items()}
    faults = PageFaults(contenders)
    cpu = interleaved(faults.wrapped, rounds=cfg.rounds, steps=cfg.steps, warmup=0, clock=time.process_time)
    log(
        f"nade: B = {cfg.batch}, D = {cfg.dim}, H = {cfg.hidden}, float32, {cfg.rounds} rounds x {cfg.steps} steps; "
        + "; ".join(
            f"{name}: {alloc[name] / 2**20:,.0f} MiB allocated per step ({alloc[name] / tensor_bytes:.1f} x one "
            f"[B, D, H] tensor), {faults.per_call(name):,.0f} minor page faults per step"
            for name in contenders
        )
    )
    label = f"NADE train step B={cfg.batch} D={cfg.dim} H={cfg.hidden}"
    rows = time_rows(label, cpu, reference="reference", targets={"ours": Target("<=", round(TARGET, 3))})
    for r in rows:
        r.unit = "CPU ms/step"
    rows[-1].note = "CPU time (process_time), ratio to the reference formulation"
    mem = [
        Row(f"NADE bytes allocated/step B={cfg.batch}", name, alloc[name] / 2**20, "MiB", note=note)
        for name, note in (("reference", ""), ("ours", "torch.profiler, ratio to the reference"))
    ]
    mem[0].ratio = 1.0
    mem[1].ratio = alloc["ours"] / alloc["reference"]
    mem[1].target = Target("<=", round(TARGET, 3))
    return rows + mem


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    intra, inter = set_threads(args.threads)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads: intra-op {intra}, inter-op {inter}")
    cfg = NADEBenchConfig.quick() if args.quick else NADEBenchConfig()
    print(format_table(run(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

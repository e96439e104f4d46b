"""The timing helpers every benchmark shares (``benchmarks.common``): the round order of
``interleaved``, the page faults ``PageFaults`` attributes to each contender, and what
``pin_malloc`` changes (in a fresh process: it is process-wide and cannot be undone)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks.common import REPO, PageFaults, interleaved


def test_interleaved_reverses_the_order_every_other_round():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    out = interleaved(contenders, rounds=4, steps=1, warmup=0)
    assert calls == list("ABCCBAABCCBA")
    assert {name: len(times) for name, times in out.items()} == {"A": 4, "B": 4, "C": 4}


def test_interleaved_steps_per_contender_and_warmup():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    interleaved(contenders, rounds=2, steps={"A": 2, "B": 1}, warmup=1)
    assert calls == ["A", "B"] + ["A", "A", "B"] + ["B", "A", "A"]


def test_page_faults_go_to_the_contender_that_touched_fresh_memory():
    mmap = pytest.importorskip("mmap")
    size = 16 << 20

    def touch():  # a fresh anonymous mapping, every page written once: size / 4 KiB faults
        m = mmap.mmap(-1, size)
        for i in range(0, size, mmap.PAGESIZE):
            m[i] = 1
        m.close()

    faults = PageFaults({"idle": lambda: None, "touch": touch})
    for _ in range(2):
        for fn in faults.wrapped.values():
            fn()
    assert faults.calls == {"idle": 2, "touch": 2}
    assert faults.per_call("touch") >= 0.9 * size / mmap.PAGESIZE
    assert faults.per_call("idle") < 0.01 * size / mmap.PAGESIZE


PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from benchmarks.common import pin_malloc
    if sys.argv[1] == "pinned":
        assert pin_malloc() is not None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    n, faults = 16 << 20, []
    for _ in range(4):  # three 16 MiB blocks at a time, as a forward pass would hold its activations
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(n) for _ in range(3)]
        for p in blocks:
            ctypes.memset(p, 1, n)
        for p in blocks:
            libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults[1:]))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pin_malloc_keeps_freed_memory_for_the_next_call():
    pages = 3 * (16 << 20) // 4096

    def faults(mode):
        cmd = [sys.executable, "-c", PROBE, mode]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)  # imports benchmarks
        return int(out.stdout.split()[-1])

    # glibc's dynamic trim threshold (twice the largest block freed, 32 MiB) hands the 48 MiB back
    assert faults("default") > 0.6 * pages
    assert faults("pinned") < 0.05 * pages  # kept by malloc and handed out again


TINY_AIS = dict(batch=3, steps=3, chains=4, leapfrog=2, rounds=1, check_batch=3, check_steps=3)


def test_ais_contenders_agree_from_the_same_seed():
    """The three AIS contenders (the reference, the reference with the prior's gradient by
    autograd, ours) compute the same log p(x) from the same random stream in float64."""
    from benchmarks.ais import contenders_for, same_seed
    from benchmarks.estimator import make_data
    from benchmarks.raw import build_vae

    model = build_vae(0).double()
    x = make_data(3, 0).double()
    est = same_seed(contenders_for(model, 4, 4, 3), x, seed=5)
    assert list(est) == ["raw", "raw-autograd-prior", "ours"]
    assert torch.isfinite(est["raw"]).all()
    for name in ("raw-autograd-prior", "ours"):
        assert torch.allclose(est[name], est["raw"], rtol=0, atol=1e-9), name
    # the stream matters: another seed gives other estimates
    assert not torch.allclose(same_seed({"raw": contenders_for(model, 4, 4, 3)["raw"]}, x, seed=6)["raw"], est["raw"])


@pytest.mark.parametrize("pinned", [True, False])
def test_ais_throughput_target_sits_on_the_pinned_rows(monkeypatch, pinned):
    """With pinned rounds the target is on ours' pinned row only; without them, on ours'
    row with malloc as it is. (pin_malloc itself is process-wide: stubbed here.)"""
    import benchmarks.ais as bench

    monkeypatch.setattr(bench, "pin_malloc", lambda: "pinned (stub)" if pinned else None)
    rows = bench.bench_throughput(bench.AISConfig(**TINY_AIS), log=lambda *_: None)
    targeted = [(r.benchmark.rsplit(", ", 1)[-1], r.contender) for r in rows if r.target is not None]
    assert targeted == [("malloc pinned" if pinned else "malloc default", "ours")]
    assert len(rows) == (6 if pinned else 3)
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)


def test_heap_trims_counts_falling_breaks_between_the_markers():
    from benchmarks.heap_trims import count_trims

    log = [
        "brk(NULL)                               = 0x1000000",
        "brk(0x1800000)                          = 0x1800000",
        "brk(0x1000000)                          = 0x1000000",  # a trim before the first marker: warm-up
        "getppid()                               = 42",
        "brk(0x2000000)                          = 0x2000000",
        "brk(0x1c00000)                          = 0x1c00000",  # trim: 4 MiB
        "brk(0x1e00000)                          = 0x1e00000",
        "brk(0x1d00000)                          = 0x1d00000",  # trim: 1 MiB
        "getppid()                               = 42",
        "brk(0x1000000)                          = 0x1000000",  # after the second marker: not counted
    ]
    assert count_trims(log) == {"trims": 2, "handed_back": 5 << 20}
    with pytest.raises(RuntimeError, match="markers"):
        count_trims(log[:3])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="strace and glibc")
def test_heap_trims_none_with_malloc_pinned():
    import shutil

    from benchmarks.heap_trims import CONTENDERS, trace

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    for name in CONTENDERS:
        r = trace(name, estimates=1, steps=3, pinned=True)
        assert r["trims"] == 0 and r["mib_handed_back"] == 0, name

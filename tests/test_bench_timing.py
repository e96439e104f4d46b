"""The timing helpers every benchmark shares (``benchmarks.common``): the round order of
``interleaved``, the page faults ``PageFaults`` attributes to each contender, and what
``pin_malloc`` changes (in a fresh process: it is process-wide and cannot be undone)."""

import subprocess
import sys
import textwrap

import pytest

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

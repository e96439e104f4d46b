"""Speed and memory benchmarks: our inference code against the same math in raw PyTorch.

Run everything with ``python -m benchmarks [--quick]``; see ``benchmarks/README.md``.
"""

"""gpupool's benchmark suite: gpupool measured against local PyTorch and against the bare wire.

Every benchmark runs gpupool and its baseline in the same run, in separate processes, alternating
repetitions, and reports medians and their ratio: the machines are noisy, so only ratios are
compared. Entry point: `python -m bench.run` (see `bench/run.py` and docs/benchmarks.md).
"""

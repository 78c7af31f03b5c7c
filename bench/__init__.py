"""Benchmarks of EE-Megatron against plain PyTorch and peer libraries; run them with ``python bench/run.py``."""

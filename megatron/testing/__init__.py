"""Helpers for tests, benchmarks and notebooks; the rest of the package never imports them.

- ``models``: ``tiny_config(arch, **overrides)``, the one builder of tiny GPT / Llama model configs;
  the single-process model-splitting pieces;
- ``generation``: tiny inference engines, prompts, sampling / early-exit parameters, greedy and KV-cache
  oracles, a chi-square test;
- ``evaluation``: a tiny model's lm-eval adapter, a hand-written task and full-forward oracles;
- ``training``: argv of a tiny training run and ``main`` on a gloo world, losses read back from the logs;
- ``pipeline``: the pipeline parity tests' model, exit layouts and micro-batches;
- ``checkpoints``: small random Megatron checkpoints and the checkpoint converter, for the tool tests;
- ``server``: the real inference server over a tiny model, in-process, and a request helper;
- ``attention``: the fp32 reference attention the fused kernels are compared with;
- ``distributed``: ``run_distributed``, a function on N gloo (or NCCL) processes;
- ``server_fuzz``: malformed-request fuzzing of a running server;
- ``ee_llm_checkpoint``: one of our checkpoints rewritten in EE-LLM's layout;
- ``assets``: the SmolLM2 GGUF of the slow tests, found without downloading.
"""

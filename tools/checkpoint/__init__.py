"""Checkpoint tools: convert (HF / GGUF / Megatron), reshard and edit the exits of early-exit checkpoints.

Command lines: ``util.py`` (a loader and a saver: ``megatron``, ``llama2_hf`` / ``llama_hf``, ``gpt2_hf``,
``gguf`` -> ``megatron`` at any tp / pp, or ``hf``) and ``checkpoint_converter.py`` (``add-exit`` /
``exit-position``). Library modules: ``megatron_io`` (checkpoint directories <-> :class:`ModelCheckpoint`),
``hf_io``, ``gguf_io``, ``exits`` (the FULL-dict edits), ``verify`` (logits of a FULL dict in one
process), ``cli`` (shared command-line plumbing). Files are read through ``megatron.checkpoint.read_file``
(checksums verified; EE-LLM files that pickle Megatron's own classes open too).
"""

from .megatron_io import Layout, ModelCheckpoint, read_megatron, write_megatron

__all__ = ["Layout", "ModelCheckpoint", "read_megatron", "write_megatron"]

"""Training data: Megatron's indexed dataset format, GPT sample indexing, blending, samplers.

Modules (imported directly, so tools that only read or write ``.bin``/``.idx`` never import torch):
``indexed_dataset`` (MMIDIDX reader/writer), ``helpers`` (C++/numpy index builders), ``index_cache``,
``gpt_dataset`` (splits, GPTDataset, build_train_valid_test_datasets), ``token_range`` (token ids
against the vocabulary), ``blendable_dataset``,
``mock_dataset`` (--mock-data), ``samplers`` (resumable data-parallel samplers, data loaders) and
``batch_utils`` (tp broadcast, attention/loss masks and position ids).
"""

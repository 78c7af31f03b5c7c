"""Suite-wide set-up.

The CPU suite hides CUDA (``CUDA_VISIBLE_DEVICES=""``, before torch is imported) so that it runs the same
on a GPU machine: its multi-process tests fork gloo workers, which cannot use a GPU their parent has
initialised, and its runs leave ``--device`` at its default (cuda whenever one is visible).
``tests/gpu`` is the CUDA rung, run on its own with ``EE_MEGATRON_GPU_TESTS=1`` (``.ci/run`` does so
wherever ``nvidia-smi`` lists a GPU); ``EE_MEGATRON_GPU_TESTS=cpu`` runs it on the CPU instead, a dry
run that checks the rung itself (what ``bench/gpu_check.py --cpu-smoke`` does).

``torch.optim`` imports ``torch._dynamo`` lazily on the first step (1-5 s). Importing it once here means
the forked workers of every multi-process test inherit it instead of paying for it per process.
"""

import os

if os.environ.get("EE_MEGATRON_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch._dynamo  # noqa: E402, F401

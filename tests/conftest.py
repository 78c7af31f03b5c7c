"""Suite-wide set-up.

``torch.optim`` imports ``torch._dynamo`` lazily on the first step (1-5 s). Importing it once here means
the forked workers of every multi-process test inherit it instead of paying for it per process.
"""

import torch._dynamo  # noqa: F401

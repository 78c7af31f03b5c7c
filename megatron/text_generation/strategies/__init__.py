"""Decoding strategies over the model's one inference forward (``EarlyExitGPTModel.infer``) and the step
protocol of ``runner.py``: each module holds a strategy's per-stage step (a ``StageRunner``) and stage 0's
loop.

- ``token_by_token``: one token per step with early exits (``early_exit``: the decisions; methods A and B);
- ``speculative`` (the stage's draft and verify steps), ``speculative_loop`` (stage 0's rounds) and
  ``acceptance`` (the verification rule): self-speculative decoding;
- ``beam``: beam search; ``scoring``: the prompt's log-probs (``tokens_to_generate`` 0).
"""

"""Text generation for EarlyExitGPTModel: sampling, the decoding strategies (``strategies/``: token by token
with early exits by KV recomputation or pipelining, self-speculative, beam search, scoring) over the
model's inference forward, the typed stage messages (``messages``) and their protocol (``runner``),
streaming, and the request/server layer. Import the submodules directly (``generation.generate``,
``engine.InferenceEngine``); this package module stays import-free so the server and the core can load
independently."""

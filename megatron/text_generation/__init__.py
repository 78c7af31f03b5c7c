"""Text generation for EarlyExitGPTModel: sampling, KV-cached decoding with early exits (KV recomputation
and pipeline-based), scoring, beam search, and the request/server layer. Import the submodules directly
(``generation.generate``, ``engine.InferenceEngine``); this package module stays import-free so the server
and the core can load independently."""

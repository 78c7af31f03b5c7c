"""Start-up of the text-generation server: the weights-source rule (no silent random weights), the
one-replica world, a checkpoint loaded through --load --use-checkpoint-args (model shape from it), and
the limit flags (ServerLimits)."""

import pytest
import torch

from megatron.config import ConfigError
from megatron.core.parallel_state import ParallelState
from megatron.core.transformer import initialization
from megatron.checkpoint import save_checkpoint
from megatron.checkpoint.model_loader import load_inference_model
from megatron.text_generation.request import ServerLimits
from megatron.text_generation.server_launch import model_info, server_args, server_limits

SHAPE = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--exit-layer-nums 2 --device cpu").split()
TOKENIZER = "--tokenizer-type NullTokenizer --vocab-size 60".split()


@pytest.mark.parametrize("flags, message", [
    (SHAPE + TOKENIZER, "--random-weights"),
    (SHAPE + TOKENIZER + ["--random-weights", "--load", "/x"], "exclude each other"),
    (SHAPE + TOKENIZER + ["--random-weights", "--use-checkpoint-args"], "needs --load"),
    (SHAPE + TOKENIZER + ["--random-weights", "--num-layers-per-virtual-pipeline-stage", "1"], "one model chunk"),
])
def test_refused_start(flags, message):
    with pytest.raises(ConfigError, match=message):
        server_args(flags)


def test_world_must_be_one_replica(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launch exactly"):
        server_args(SHAPE + TOKENIZER + ["--random-weights"])


def test_random_weights_build():
    args = server_args(SHAPE + TOKENIZER + ["--random-weights", "--sequence-parallel"])
    run, state, tokenizer, chunks = load_inference_model(args)
    assert len(chunks) == 1 and not chunks[0].training and not args.sequence_parallel
    info = model_info(args, run)
    assert (info.name, info.num_layers, info.exit_layers, info.pp) == ("random-weights", 4, [2], 1)
    assert info.vocab_size == tokenizer.vocab_size == 61  # NullTokenizer: ids 0..59 and eod 60


def test_checkpoint_loaded_with_its_args(tmp_path, monkeypatch):
    saved_args = server_args(SHAPE + TOKENIZER + ["--random-weights", "--seed", "7"])
    run, state, _, (saved,) = load_inference_model(saved_args)
    save_checkpoint(str(tmp_path), 3, [saved], None, None, ParallelState.single(), saved_args, save_optim=False,
                    save_rng=False)
    # No model-shape flags: they come from the checkpoint; the default seed would give other weights.
    args = server_args(["--load", str(tmp_path), "--use-checkpoint-args", "--device", "cpu"] + TOKENIZER)
    with monkeypatch.context() as m:  # the checkpoint is loaded strictly next: no initial weight is drawn
        m.setattr(initialization, "derive_seed", _no_draws)
        run, _, _, (loaded,) = load_inference_model(args)
    assert run.model.num_layers == 4 and run.early_exit.exit_layer_nums == [2]
    expected = saved.state_dict()
    _, _, _, (fresh,) = load_inference_model(server_args(SHAPE + TOKENIZER + ["--random-weights"]))
    assert any(not torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert model_info(args, run).name == tmp_path.name


def _no_draws(*args):
    raise AssertionError("a weight was drawn although a checkpoint is loaded into the model next")


def test_limit_flags(capsys):
    args = server_args(SHAPE + TOKENIZER + ["--random-weights", "--max-body-bytes", "1000", "--max-prompts", "4",
                                            "--max-beam-width", "3", "--max-batch-tokens", "99",
                                            "--max-connections", "5", "--read-timeout", "2.5",
                                            "--rank-sync-timeout", "7"])
    assert server_limits(args) == ServerLimits(max_body_bytes=1000, max_prompts=4, max_beam_width=3, max_batch_tokens=99,
                                               max_connections=5, read_timeout_s=2.5, sync_timeout_s=7.0)
    assert server_limits(server_args(SHAPE + TOKENIZER + ["--random-weights"])) == ServerLimits()
    for flag, value in (("--max-beam-width", "0"), ("--read-timeout", "-1"), ("--max-connections", "many")):
        with pytest.raises(SystemExit):
            server_args(SHAPE + TOKENIZER + ["--random-weights", flag, value])
        assert flag in capsys.readouterr().err

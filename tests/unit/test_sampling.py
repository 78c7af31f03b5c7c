"""Token selection (``megatron/text_generation/sampling.py``): top-k and top-p keep only the allowed tokens,
top-p decays per step down to its bound, and bad sampling parameters are named. (The generation tests'
shared builders and oracles that used to live in this file are in ``megatron/testing/generation.py``.)"""

import pytest
import torch

from megatron.text_generation.request import SamplingParams
from megatron.text_generation.sampling import check_sampling, select_tokens, top_p_at


# ---------------------------------------------------------------------------------- sampling unit tests

def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(400, generator=g, dtype=torch.float64)  # noqa: E731 -- each row's uniform number
    top_k = select_tokens(logits, SamplingParams(top_k=2), 0, u())
    assert set(top_k.tolist()) == {0, 1}
    top_p = select_tokens(logits, SamplingParams(top_p=0.7), 0, u())  # 0.5 < 0.7 <= 0.8: two tokens
    assert set(top_p.tolist()) == {0, 1}
    everything = select_tokens(logits, SamplingParams(), 0, u())
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert select_tokens(logits[:3], SamplingParams(greedy=True), 0, None).tolist() == [0, 0, 0]
    cold = select_tokens(logits, SamplingParams(temperature=0.01), 0, u())
    assert set(cold.tolist()) == {0}


def test_top_p_decays_per_step_down_to_its_bound():
    p = SamplingParams(top_p=0.8, top_p_decay=0.5, top_p_bound=0.3)
    assert [top_p_at(p, s) for s in range(3)] == [0.8, 0.4, 0.3]
    assert top_p_at(SamplingParams(top_p=0.8), 5) == 0.8


@pytest.mark.parametrize("bad, field", [(dict(top_k=2, top_p=0.5), "top_k and top_p"),
                                        (dict(temperature=0.0), "temperature"),
                                        (dict(tokens_to_generate=-1), "tokens_to_generate"),
                                        (dict(beam_width=0), "beam_width")])
def test_bad_sampling_parameters_are_named(bad, field):
    with pytest.raises(ValueError, match=field):
        check_sampling(SamplingParams(**bad))

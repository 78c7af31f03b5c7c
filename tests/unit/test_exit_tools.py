"""The exit-measurement and tuning-data tools: ``megatron/evaluation/exit_quality.py`` against hand-computed
values and a direct forward, ``tools/measure_exits.py`` and ``tools/generate_tuning_data.py`` end to end on a tiny
random model (in-process, one rank)."""

import json

import pytest
import torch

from megatron.config import EarlyExitConfig
from megatron.core.parallel_state import ParallelState
from megatron.data.indexed_dataset import IndexedDataset
from megatron.evaluation.exit_quality import DecodeCosts, ExitPredictions, calibration, exit_predictions, project, recommend
from megatron.model import EarlyExitGPTModel
from megatron.testing.models import tiny_config
from tools import generate_tuning_data, measure_exits

MODEL = ("--random-weights --num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--max-position-embeddings 64 --exit-layer-nums 1 3 --use-exit-norm --init-method-std 0.3 "
         "--tokenizer-type NullTokenizer --vocab-size 60 --device cpu").split()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


def hand_predictions():
    #            positions:    0  1  2  3
    return ExitPredictions(final=torch.tensor([5, 6, 7, 8]),
                           top1={1: torch.tensor([5, 0, 7, 0]), 2: torch.tensor([5, 6, 0, 8])},
                           confidence={1: torch.tensor([0.9, 0.8, 0.2, 0.1]), 2: torch.tensor([0.5, 0.95, 0.9, 0.3])},
                           estimate={1: torch.tensor([0.9, 0.1, 0.9, 0.1]), 2: torch.tensor([0.9, 0.9, 0.1, 0.9])})


def test_projection_replays_the_exit_rule_with_the_measured_costs():
    preds, costs = hand_predictions(), DecodeCosts(layer_s=1.0, head_s=2.0, check_s=0.5, estimator_s=0.1)
    assert preds.agreement(1) == 0.5 and preds.agreement(2) == 0.75
    p = project(preds, (1, 2), 0.75, costs, num_layers=4)
    # pos 0, 1 leave at exit 1 (cost 0.5 + 1), pos 2 leaves at exit 2 (0.5 + 0.5 + 2), pos 3 runs full depth
    # (0.5 + 0.5 + 4 + 2); tokens: 5 (right), 0 (wrong), 0 (wrong), 8 (right)
    assert p.share == {1: 0.5, 2: 0.25}
    assert p.fidelity == 0.5
    assert p.speedup == pytest.approx(6.0 / ((1.5 + 1.5 + 3.0 + 7.0) / 4))
    f = project(preds, (1, 2), 0.75, costs, num_layers=4, estimator_floor=0.5)
    # exit 1 is checked at pos 0, 2 only (pos 0 leaves); exit 2 at pos 1, 3 (pos 1 leaves); pos 2, 3 full depth
    assert f.share == {1: 0.25, 2: 0.25} and f.fidelity == 1.0
    cost = [0.1 + 0.5 + 1, 0.1 + 0.1 + 0.5 + 2, 0.1 + 0.5 + 0.1 + 6, 0.1 + 0.1 + 0.5 + 6]
    assert f.speedup == pytest.approx(6.0 / (sum(cost) / 4))
    best = recommend(preds, costs, 4, min_fidelity=1.0, thresholds=(0.75, 0.9), floors=(None, 0.5), max_exits=2)
    assert best.fidelity == 1.0 and best.estimator_floor == 0.5


def test_calibration_bins_confidence_against_agreement():
    c = calibration(torch.tensor([0.05, 0.15, 0.95, 0.92]), torch.tensor([False, True, True, False]), bins=10)
    assert [b["count"] for b in c["bins"]] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert c["bins"][9]["agreement"] == 0.5
    assert c["ece"] == pytest.approx((0.05 + 0.85 + 2 * abs(0.935 - 0.5)) / 4)


def test_exit_predictions_equal_a_direct_forward():
    cfg = tiny_config(None, vocab_size=60, make_vocab_size_divisible_by=16, seq_length=32, init_method_std=0.3, seed=3)
    model = EarlyExitGPTModel(cfg, EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True),
                              state=ParallelState.single()).eval()
    seqs, starts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]], [2, 0]
    preds = exit_predictions(model, seqs, starts)
    finals, exits = [], {1: [], 3: []}
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            out = model(input_ids=torch.tensor([seq[:-1]]))
            finals.append(out.output[0, start:, :60].argmax(-1))
            for layer in exits:
                exits[layer].append(out.exit_logits[layer][0, start:, :60].argmax(-1))
    assert torch.equal(preds.final, torch.cat(finals))
    for layer in exits:
        assert torch.equal(preds.top1[layer], torch.cat(exits[layer]))
        assert ((preds.confidence[layer] > 0) & (preds.confidence[layer] <= 1)).all()


def test_measure_exits_writes_the_report(tmp_path, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": " ".join(str((7 * i + j) % 50) for j in range(20))})
                              for i in range(3)) + "\n")
    assert measure_exits.main(["--text", str(text), "--output-dir", str(tmp_path / "out"), "--thresholds", "0.5,0.1",
                               "--"] + MODEL) == 0
    r = json.loads((tmp_path / "out" / "exits.json").read_text())
    assert r["positions"] == 3 * 19 and set(r["exits"]) == {"1", "3"}
    assert all(0 <= e["agreement"] <= 1 and len(e["confidence"]["bins"]) == 10 for e in r["exits"].values())
    assert [p["threshold"] for p in r["projection_all_exits"]] == [0.5, 0.1]
    assert r["costs_s"]["layer_s"] > 0 and r["costs_s"]["head_s"] > 0
    assert "teacher-forced agreement" in capsys.readouterr().out


def test_generate_tuning_data_writes_prompt_plus_continuation(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("1 2 3\n4 5\n6 7 8 9\n")

    def run(prefix, seed):
        argv = ["--prompts", str(prompts), "--tokens", "5", "--batch-size", "2", "--samples-per-prompt", "2",
                "--seed", str(seed), "--output-prefix", str(tmp_path / prefix), "--"] + MODEL
        assert generate_tuning_data.main(argv) == 0
        ds = IndexedDataset(str(tmp_path / f"{prefix}_text_document"))
        return [ds[i].tolist() for i in range(len(ds))]

    docs = run("a", 1)
    assert len(docs) == 6
    for i, prompt in enumerate([[1, 2, 3], [4, 5], [6, 7, 8, 9]]):
        for doc in docs[2 * i: 2 * i + 2]:
            assert doc[:len(prompt)] == prompt and len(prompt) < len(doc) <= len(prompt) + 5
    assert run("b", 1) == docs  # reproducible from the seed
    assert run("c", 2) != docs
    with pytest.raises(ValueError, match="--temperature"):
        generate_tuning_data.main(["--prompts", str(prompts), "--output-prefix", str(tmp_path / "x"),
                                   "--temperature", "0", "--"] + MODEL)

"""Local task files: the hand-written 5-item multiple-choice task scored through the adapter matches the
accuracy computed by hand from direct log-likelihoods; perplexity and exact-match tasks; checked files;
the command-line runner end to end on a random model."""

import json
import math

import pytest

from megatron.evaluation import HAVE_LM_EVAL, load_task, run_task
from megatron.evaluation.__main__ import main

from megatron.testing.evaluation import MODEL_FLAGS, NUM_LAYERS, TASK, continuation_logprob, make_lm, write_task


def test_choice_accuracy_matches_direct_loglikelihoods(tmp_path):
    task = load_task(write_task(tmp_path / "mc.jsonl"))
    assert (task.kind, len(task.items)) == ("choice", 5)
    for layer in (None, 1):
        lm = make_lm(exit_layer=layer)
        acc = acc_norm = 0
        for it in TASK:
            ctx = lm.tok_encode(it["context"])
            lps = [continuation_logprob(lm, ctx, lm.tok_encode(c), layer)[0] for c in it["choices"]]
            norm = [lp / len(c) for lp, c in zip(lps, it["choices"])]
            acc += lps.index(max(lps)) == it["gold"]
            acc_norm += norm.index(max(norm)) == it["gold"]
        got = run_task(lm, task)
        assert got["acc"] == pytest.approx(acc / 5) and got["acc_norm"] == pytest.approx(acc_norm / 5)
        assert got["mean_scored_exit_layer"] == (layer or NUM_LAYERS)


def test_perplexity_of_text_and_jsonl(tmp_path):
    lm = make_lm(max_length=8)
    (tmp_path / "doc.txt").write_text("1 2 3 4 5 6 7 8 9 10 11 12")
    (tmp_path / "docs.jsonl").write_text('{"text": "1 2 3 4 5 6"}\n{"text": "7 8 9 10 11 12"}\n')
    one = run_task(lm, load_task(str(tmp_path / "doc.txt")))
    assert one["kind"] == "perplexity" and one["tokens"] == 12
    (want,) = lm.loglikelihood_rolling([("1 2 3 4 5 6 7 8 9 10 11 12",)])
    assert one["perplexity"] == pytest.approx(math.exp(-want / 12))
    two = run_task(lm, load_task(str(tmp_path / "docs.jsonl")))
    assert two["tokens"] == 12 and two["items"] == 2 and two["perplexity"] != pytest.approx(one["perplexity"])


def test_exact_match_task(tmp_path):
    lm = make_lm()
    (first,) = lm.generate_until([("1 2 3", {"max_gen_toks": 2})])
    items = [{"context": "1 2 3", "answer": first + " "}, {"context": "1 2 3", "answer": "not it"}]
    path = tmp_path / "em.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    got = run_task(lm, load_task(str(path)), max_gen_toks=2)
    assert got["kind"] == "exact_match" and got["exact_match"] == 0.5 and got["outputs"] == [first, first]


@pytest.mark.parametrize("lines, kind, message", [
    (['{"context": "1", "choices": [" 2", " 3"], "gold": 2}'], "auto", "'gold' must be an index"),
    (['{"context": "1", "choices": [" 2"], "gold": 0}'], "auto", "at least two"),
    (['{"context": "1", "choices": [" 2", " 3"]}'], "auto", r"lacks \['gold'\]"),
    (['{"question": "1"}'], "auto", "cannot tell the task kind"),
    (['not json'], "auto", "line 1 is not JSON"),
    ([], "auto", "no items"),
    (['{"text": "1"}'], "trivia", "--task-type must be one of"),
    (['{"text": "1"}'], "exact_match", r"lacks \['context', 'answer'\]"),
])
def test_bad_task_files_are_named(tmp_path, lines, kind, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_task(str(path), kind)


def test_missing_task_file():
    with pytest.raises(ValueError, match="--task /no/such.jsonl: no such file"):
        load_task("/no/such.jsonl")


def test_runner_cli_end_to_end(tmp_path, capsys):
    mc = write_task(tmp_path / "mc.jsonl")
    (tmp_path / "doc.txt").write_text("3 1 4 1 5 9 2 6")
    out = tmp_path / "results.json"
    flags = ["--task", mc, "--task", str(tmp_path / "doc.txt"), "--output", str(out)]
    assert main(flags + ["--exit-layer", "1", "--"] + MODEL_FLAGS) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["task"] for r in results] == ["mc", "doc"] and results[0]["exit_layer"] == 1
    assert results[0]["mean_scored_exit_layer"] == 1.0 and results[1]["tokens"] == 8
    assert '"task": "mc"' in capsys.readouterr().out
    main(flags + ["--"] + MODEL_FLAGS)
    full = json.loads(out.read_text())["results"]
    assert full[1]["perplexity"] != pytest.approx(results[1]["perplexity"])  # the exit flag changed the numbers


def test_runner_needs_a_task_and_names_missing_lm_eval(tmp_path):
    with pytest.raises(ValueError, match="at least one --task"):
        main(["--"] + MODEL_FLAGS)
    if not HAVE_LM_EVAL:  # lm-eval's own tasks: a clear message, before any model is built
        with pytest.raises(ValueError, match="pip install lm-eval"):
            main(["--lm-eval-task", "hellaswag", "--"])

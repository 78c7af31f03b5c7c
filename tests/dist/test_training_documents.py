"""Document-separated training (``--reset-attention-mask --reset-position-ids --eod-mask-loss``) through the
entry point: the per-microbatch masks built as the schedule consumes them give a pp = 2 run the losses of
the one-process run, and the flags do change the numbers (issue 14, item 10)."""

from megatron.testing.training import NO_DROPOUT, logged_losses, run_main, tiny_argv

DOCUMENTS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


def test_document_masks_through_the_pipeline_equal_one_process():
    argv = tiny_argv("--tokenizer-type", "NullTokenizer", train_iters=2, **NO_DROPOUT)  # eod = vocab size
    want = logged_losses(run_main(1, argv + DOCUMENTS)[0])
    got = logged_losses(run_main(2, argv + DOCUMENTS + ["--pipeline-model-parallel-size", "2"])[0])
    plain = logged_losses(run_main(1, argv)[0])
    assert len(want) == 2 and want[0].keys() == got[0].keys() == {"lm loss", "early loss [1]", "early loss [3]"}
    for w, g in zip(want, got):
        assert all(abs(g[k] - w[k]) <= 1e-5 * abs(w[k]) for k in w), (g, w)
    assert want != plain, "the document flags must change the losses"

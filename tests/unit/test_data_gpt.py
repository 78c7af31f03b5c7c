"""GPT dataset indexing against a literal transcription of Megatron's ``_build_index_mappings``
(``megatron/data/gpt_dataset.py``, with ``build_sample_idx`` of ``helpers.cpp``), sample contents against the token
stream, C++ == numpy index builders, the index cache, blending weights, mock data and the batch masks."""

import hashlib
import os

import numpy as np
import pytest
import torch

from megatron.data import helpers
from megatron.data.batch_utils import get_ltor_masks_and_position_ids
from megatron.data.blendable_dataset import BlendableDataset, parse_blend
from megatron.data.gpt_dataset import build_index_arrays, build_train_valid_test_datasets, get_train_valid_test_split
from megatron.data.indexed_dataset import write_dataset
from megatron.data.mock_dataset import BRANCHES, MockGPTDataset

needs_cpp = pytest.mark.skipif(not helpers.HAVE_CPP, reason=f"C++ helpers not built ({helpers.CPP_IMPORT_ERROR}); "
                               "run `python setup.py build_ext --inplace`")


# ---- Megatron's index mappings, step by step (loops on purpose: an oracle, not an implementation) ----
def ref_sample_idx(sizes, doc_idx, seq_len, epochs, tokens_per_epoch):
    n = (epochs * tokens_per_epoch - 1) // seq_len
    out = [(0, 0)]
    doc_pos, offset = 0, 0
    for _ in range(n):
        remaining = seq_len + 1
        while True:
            length = sizes[doc_idx[doc_pos]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                break
            doc_pos, offset = doc_pos + 1, 0
        out.append((doc_pos, offset))
    return np.array(out, np.int32)


def ref_indices(documents, sizes, num_samples, seq_len, seed):
    tokens = int(sum(sizes[d] for d in documents))
    epochs = 1
    while (epochs * tokens - 1) // seq_len < num_samples:
        epochs += 1
    rng = np.random.RandomState(seed)
    separate = False
    if epochs > 1:
        before_last = ((epochs - 1) * tokens - 1) // seq_len
        separate = num_samples - before_last < int(0.8 * ((tokens - 1) // seq_len))

    def shuffled_docs(e):
        d = np.mgrid[0:e, 0:len(documents)][1]
        d[:] = documents
        d = d.reshape(-1).astype(np.int32)
        rng.shuffle(d)
        return d

    doc_idx = np.concatenate((shuffled_docs(epochs - 1), shuffled_docs(1))) if separate else shuffled_docs(epochs)
    sample_idx = ref_sample_idx(sizes, doc_idx, seq_len, epochs, tokens)
    total = len(sample_idx) - 1
    first = np.arange(before_last if separate else total, dtype=np.uint32)
    rng.shuffle(first)
    if separate:
        last = np.arange(before_last, total, dtype=np.uint32)
        rng.shuffle(last)
        first = np.concatenate((first, last))
    return doc_idx, sample_idx, first, separate


def _sizes(seed, n, empty_every=7):
    sizes = np.random.RandomState(seed).randint(1, 40, size=n).astype(np.int32)
    sizes[::empty_every] = 0  # empty documents must be skipped exactly as the walk does
    sizes[1] = 1
    return sizes


@pytest.mark.parametrize("num_samples,seq_len", [(20, 8), (150, 16), (260, 7), (1000, 32), (5, 1)])
def test_index_arrays_match_reference(num_samples, seq_len):
    sizes = _sizes(num_samples, 60)
    documents = np.arange(3, 57, dtype=np.int32)
    doc_idx, sample_idx, shuffle_idx, _ = ref_indices(documents, sizes, num_samples, seq_len, 1234)
    for impl in (["numpy", "cpp"] if helpers.HAVE_CPP else ["numpy"]):
        got = build_index_arrays(documents, sizes, num_samples, seq_len, 1234, impl=impl)
        np.testing.assert_array_equal(got["doc_idx"], doc_idx)
        np.testing.assert_array_equal(got["sample_idx"], sample_idx)
        np.testing.assert_array_equal(got["shuffle_idx"], shuffle_idx)
        assert got["doc_idx"].dtype == np.int32 and got["sample_idx"].dtype == np.int32
        assert got["shuffle_idx"].dtype == np.uint32


def test_last_epoch_rule_both_ways():
    sizes = np.full(10, 10, np.int32)  # 100 tokens, 9 samples per epoch at seq_len 11
    assert ref_indices(np.arange(10), sizes, 10, 11, 1)[3]  # 1 of 9 samples in epoch 2: separate
    assert not ref_indices(np.arange(10), sizes, 17, 11, 1)[3]  # 8 of 9: one joint shuffle
    for n in (10, 17):
        got = build_index_arrays(np.arange(10), sizes, n, 11, 1)
        np.testing.assert_array_equal(got["shuffle_idx"], ref_indices(np.arange(10), sizes, n, 11, 1)[2])


@needs_cpp
def test_cpp_and_numpy_builders_agree_exactly():
    rng = np.random.RandomState(7)
    for trial in range(20):
        sizes = rng.randint(0, 300, size=rng.randint(2, 400)).astype(np.int32)
        sizes[0] = max(sizes[0], 1)
        doc_idx = rng.permutation(np.tile(np.arange(len(sizes), dtype=np.int32), 3))
        tokens = int(sizes.sum())
        seq = int(rng.randint(1, 200))
        a = helpers.build_sample_idx(sizes, doc_idx, seq, 3, tokens, impl="cpp")
        b = helpers.build_sample_idx(sizes, doc_idx, seq, 3, tokens, impl="numpy")
        np.testing.assert_array_equal(a, b)
        w = rng.rand(rng.randint(1, 6))
        w /= w.sum()
        for x, y in zip(helpers.build_blending_indices(w, 3000, impl="cpp"),
                        helpers.build_blending_indices(w, 3000, impl="numpy")):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype


@pytest.fixture
def corpus(tmp_path):
    """Tokens are unique (doc * 1000 + position) so every sample can be traced to its source."""
    rng = np.random.RandomState(3)
    docs = [np.arange(rng.randint(1, 60), dtype=np.int64) + 1000 * d for d in range(80)]
    prefix = str(tmp_path / "corpus_text_document")
    write_dataset(prefix, docs, np.int32)
    return prefix, docs


def test_samples_are_the_token_stream_and_cover_an_epoch_once(corpus):
    prefix, docs = corpus
    seq = 16
    bounds = get_train_valid_test_split("80,10,10", len(docs))
    train_tokens = sum(len(docs[d]) for d in range(bounds[0], bounds[1]))
    n = (train_tokens - 1) // seq  # exactly one epoch
    train, valid, test = build_train_valid_test_datasets([prefix], "80,10,10", [n, 5, 5], seq, 1234)
    assert len(train) == n and valid is not None and test is not None
    stream = np.concatenate([docs[d] for d in train.doc_idx])
    seen = []
    for i in range(len(train)):
        sample = train[i]["text"]
        j = int(train.shuffle_idx[i])
        assert sample.dtype == np.int64 and len(sample) == seq + 1
        np.testing.assert_array_equal(sample, stream[j * seq:j * seq + seq + 1])
        seen.extend(sample[:-1].tolist())
    assert len(seen) == len(set(seen)) == n * seq  # no token twice within the epoch
    all_tokens = set(np.concatenate([docs[d] for d in range(bounds[0], bounds[1])]).tolist())
    assert len(all_tokens - set(seen)) < seq + 1  # only the final partial sample is missing
    for ds in (valid, test):
        assert all(len(ds[i]["text"]) == seq + 1 for i in range(len(ds)))


def test_split_boundaries():
    assert get_train_valid_test_split("990,9,1", 1000) == [0, 990, 999, 1000]
    assert get_train_valid_test_split("1,1,1", 10) == [0, 4, 7, 10]  # rounding drift subtracted
    assert get_train_valid_test_split("98/2", 50) == [0, 49, 50, 50]
    with pytest.raises(ValueError, match="--split"):
        get_train_valid_test_split("a,b", 10)


def test_index_cache_is_built_once_with_megatron_names(corpus, tmp_path):
    prefix, _ = corpus
    first = build_train_valid_test_datasets([prefix], "80,10,10", [50, 5, 5], 16, 99)[0]
    again = build_train_valid_test_datasets([prefix], "80,10,10", [50, 5, 5], 16, 99)[0]
    assert first.index_built_here and not again.index_built_here
    desc = (f"GPT Dataset\n\nData prefix {prefix}\nDataset name train\nNumber of samples 50\n"
            "Sequence length 16\nRandom seed 99\nSplit 80,10,10\n")
    digest = hashlib.md5(desc.encode()).hexdigest()
    cache = os.path.join(os.path.dirname(prefix), "index-cache")
    for suffix in (".dsc", "_doc_idx.npy", "_sample_idx.npy", "_shuffle_idx.npy"):
        assert os.path.isfile(os.path.join(cache, digest + suffix))
    assert open(os.path.join(cache, digest + ".dsc")).read() == desc
    np.testing.assert_array_equal(first.shuffle_idx, again.shuffle_idx)
    other = build_train_valid_test_datasets([prefix], "80,10,10", [50, 5, 5], 16, 100,
                                            data_cache_path=str(tmp_path / "elsewhere"))[0]
    assert other.index_built_here and os.listdir(tmp_path / "elsewhere")


def test_blending_meets_weights_within_one_percent(tmp_path):
    rng = np.random.RandomState(5)
    prefixes = []
    for k in range(3):
        prefixes.append(str(tmp_path / f"d{k}"))
        write_dataset(prefixes[-1], [rng.randint(0, 100, size=rng.randint(5, 50)) + 1000 * k for _ in range(40)],
                      np.uint16)
    n = 3000
    blend = ["0.5", prefixes[0], "0.3", prefixes[1], "0.2", prefixes[2]]
    train, _, _ = build_train_valid_test_datasets(blend, "100,0,0", [n, 0, 0], 8, 1234,
                                                  data_cache_path=str(tmp_path / "cache"))
    _, weights, counts = parse_blend(blend, [n, 0, 0])
    assert [c[0] for c in counts] == [1508, 905, 603]  # ceil(n * w * 1.005)
    assert len(train) == sum(c[0] for c in counts)
    share = np.bincount(np.asarray(train.dataset_index), minlength=3) / len(train)
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.01)
    for i in (0, 1, 2, len(train) - 1):
        item = train[i]
        assert len(item["text"]) == 9 and item["text"][0] // 1000 == item["dataset_idx"]
    for d in range(3):  # each dataset's samples are used in order, none twice
        picked = np.asarray(train.dataset_sample_index)[np.asarray(train.dataset_index) == d]
        np.testing.assert_array_equal(picked, np.arange(len(picked)))


def test_blending_rule_by_hand():
    idx, sample = helpers.build_blending_indices(np.array([0.5, 0.5]), 6)
    assert idx.tolist() == [0, 1, 0, 1, 0, 1] and sample.tolist() == [0, 0, 1, 1, 2, 2]
    idx, _ = helpers.build_blending_indices(np.array([0.25, 0.75]), 8)
    assert idx.tolist() == [1, 0, 1, 1, 0, 1, 1, 1]  # i=4 ties: first wins
    with pytest.raises(ValueError, match="has 2"):
        BlendableDataset([list(range(2)), list(range(100))], [0.5, 0.5], 10)


def test_mock_dataset_is_deterministic_and_structured():
    a = MockGPTDataset(50, 63, 97, seed=3, eod=96)
    b = MockGPTDataset(50, 63, 97, seed=3, eod=96)
    successors = {}
    for i in range(len(a)):
        x = a[i]["text"]
        np.testing.assert_array_equal(x, b[i]["text"])
        assert len(x) == 64 and x.min() >= 0 and x.max() < 97
        for s, t in zip(x[:-1].tolist(), x[1:].tolist()):
            if s != 96 and t != 96:
                successors.setdefault(s, set()).add(t)
    assert max(len(v) for v in successors.values()) <= BRANCHES  # learnable: few successors per token
    assert any((a[i]["text"] == 96).any() for i in range(len(a)))
    assert not np.array_equal(MockGPTDataset(1, 63, 97, seed=4)[0]["text"], a[0]["text"])


def test_masks_and_position_ids():
    eod = 9
    tokens = torch.tensor([[1, 2, eod, 3, 4, eod, 5], [eod, 1, 2, 3, 4, 5, 6]])
    mask, loss, pos = get_ltor_masks_and_position_ids(tokens, eod, False, False, False)
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], ~torch.ones(7, 7).tril().bool())  # True = masked out (future)
    assert torch.equal(loss, torch.ones(2, 7)) and torch.equal(pos, torch.arange(7).expand(2, 7))
    mask, loss, pos = get_ltor_masks_and_position_ids(tokens, eod, True, True, True)
    assert mask.shape == (2, 1, 7, 7)
    assert pos[0].tolist() == [0, 1, 2, 0, 1, 2, 0] and pos[1].tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert loss[0].tolist() == [1, 1, 0, 1, 1, 0, 1] and loss.dtype == torch.float32
    allowed = ~mask[0, 0]
    assert allowed[3].tolist() == [False, False, False, True, False, False, False]  # new doc sees itself only
    assert allowed[6, 6] and not allowed[6, 5] and allowed[4, 3]

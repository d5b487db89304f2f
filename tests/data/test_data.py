"""Data: byte tokenizer, `preprocess` into Megatron indexed datasets, GPTDataset batches,
the embedded corpus, and the DP split of a global batch."""
import json
import sys

import pytest
import torch

from megatron_wesar.data.corpus import BLOCK_BYTES, HELD_OUT_EVERY, split_tokens
from megatron_wesar.data.preprocess import iter_documents, preprocess
from megatron_wesar.data.preprocess import main as preprocess_main
from megatron_wesar.data.sources import (
    EmbeddedCorpus,
    IndexedDatasets,
    microbatches,
    windows_to_batch,
)
from megatron_wesar.data.tokenizers import BYTE_EOD, ByteTokenizer, build_tokenizer

DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i) for i in range(40)]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.tokenize("héllo\0 world")
    assert BYTE_EOD not in ids and max(ids) < tok.vocab_size == 256
    assert tok.detokenize(ids) == "héllo world"


def test_hugging_face_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = str(tmp_path / "tokenizer.json")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3, "<|endoftext|>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)
    loaded = build_tokenizer(path)
    assert loaded.vocab_size == 5
    assert loaded.eod == 4  # "<|endoftext|>" is preferred to "</s>" (not the lowest id)
    assert loaded.tokenize("hello world moon") == [1, 2, 0]
    assert loaded.detokenize([2, 1]) == "world hello"


def test_hugging_face_tokenizer_without_the_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with pytest.raises(ImportError, match="pip install tokenizers"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def test_preprocess_writes_an_indexed_dataset_of_every_document(tmp_path, jsonl):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = preprocess([str(jsonl)], str(tmp_path / "out" / "docs"), ByteTokenizer())
    assert counts["documents"] == len(DOCS)
    dataset = IndexedDataset(str(tmp_path / "out" / "docs"))
    assert len(dataset) == len(DOCS)
    for i in (0, 17, 39):
        ids = dataset[i].tolist()
        assert ids[-1] == BYTE_EOD
        assert ByteTokenizer().detokenize(ids) == DOCS[i]
    assert counts["tokens"] == sum(len(d.encode()) + 1 for d in DOCS)


def test_preprocess_cli_and_clear_errors(tmp_path, jsonl, capsys):
    assert preprocess_main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "d")]) == 0
    assert "40 documents" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="input file not found"):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        list(iter_documents(str(bad)))
    with pytest.raises(ValueError, match="no 'body' field"):
        list(iter_documents(str(jsonl), json_key="body"))
    text = tmp_path / "plain.txt"
    text.write_text("first para\n\nsecond para\n")
    assert list(iter_documents(str(text))) == ["first para", "second para\n"]


def test_indexed_datasets_give_deterministic_gpt_batches(tmp_path, jsonl):
    preprocess([str(jsonl)], str(tmp_path / "docs"), ByteTokenizer())
    make = lambda: IndexedDatasets(  # noqa: E731
        [str(tmp_path / "docs")], "90,10,0", seq_length=32, seed=7, tokenizer=ByteTokenizer(),
        train_samples=64, valid_samples=8, cache_dir=str(tmp_path / "cache"),
    )
    data = make()
    batch = data.train_batch(3, 4)
    assert batch["tokens"].shape == (4, 32) and batch["labels"].shape == (4, 32)
    # labels are the next tokens of the same stream
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    again = make().train_batch(3, 4)  # a resumed run (cached indices) sees the same batch
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    text = ByteTokenizer().detokenize(batch["tokens"][0].tolist())
    assert "lorem ipsum" in text
    assert data.valid_batch(0, 2)["tokens"].shape == (2, 32)


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="megatron-wesar preprocess"):
        IndexedDatasets([str(tmp_path / "nothing")], "98,2,0", 32, 1, ByteTokenizer(), 8, 8)


def test_embedded_corpus_split_and_determinism():
    data = bytes(range(256)) * (BLOCK_BYTES * HELD_OUT_EVERY * 2 // 256)
    split = split_tokens(data)
    assert len(split.valid) == 2 * BLOCK_BYTES
    assert len(split.train) + len(split.valid) == len(data)
    corpus = EmbeddedCorpus(seq_length=64, seed=3, max_bytes=300_000)
    a, b = corpus.train_batch(5, 8), corpus.train_batch(5, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tokens"], corpus.train_batch(6, 8)["tokens"])
    assert torch.equal(corpus.valid_batch(0, 4)["tokens"], corpus.valid_batch(0, 4)["tokens"])


def test_microbatches_split_the_global_batch_over_data_parallel_ranks():
    windows = torch.arange(8 * 5).view(8, 5)
    batch = windows_to_batch(windows)
    parts = [list(microbatches(batch, r, 2, 2)) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    stacked = torch.cat([m["tokens"] for p in parts for m in p])
    assert torch.equal(stacked, windows[:, :-1])
    with pytest.raises(ValueError, match="not divisible"):
        list(microbatches(batch, 0, 3, 2))

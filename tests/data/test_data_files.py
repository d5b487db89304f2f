"""Damaged and replaced data files: `preprocess` writes its pair atomically and names the file
and line of every input error; a .bin/.idx pair is checked when opened; a prefix written again
is not paired with megatron's sample indices cached for its old content."""
import json
import os

import pytest

from megatron_wesar.data.indexed import IndexedDatasetError, inspect_indexed_dataset
from megatron_wesar.data.preprocess import preprocess
from megatron_wesar.data.sources import IndexedDatasets
from megatron_wesar.data.tokenizers import ByteTokenizer

DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i) for i in range(40)]


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _open(prefix, cache_dir=None):
    return IndexedDatasets([prefix], "90,10,0", seq_length=32, seed=7, tokenizer=ByteTokenizer(),
                           train_samples=64, valid_samples=8, cache_dir=cache_dir)


@pytest.fixture
def prefix(tmp_path):
    """A preprocessed pair of DOCS (8 KB of byte tokens)."""
    out = str(tmp_path / "data" / "docs")
    preprocess([_jsonl(tmp_path / "docs.jsonl", DOCS)], out, ByteTokenizer())
    return out


def _bytes(prefix):
    return {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}


def test_a_failed_preprocess_leaves_the_existing_pair_untouched(tmp_path, prefix):
    good = _bytes(prefix)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 123}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        preprocess([_jsonl(tmp_path / "more.jsonl", DOCS), str(bad)], prefix, ByteTokenizer())
    assert _bytes(prefix) == good
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["docs.bin", "docs.idx"]  # no leftovers


@pytest.mark.parametrize("content, what", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not UTF-8 \(byte 0xe9 at column 14"),
    (b'{"text": "ok"}\n["a list"]\n', r"bad\.jsonl:2: not a JSON object \(a list\)"),
    (b'{"text": "ok"}\n\n{"text": 123}\n', r"bad\.jsonl:3: the 'text' field is a int, not a str"),
    (b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no 'text' field"),
    (b'{"text": "ok"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
])
def test_every_input_error_names_the_file_and_line(tmp_path, content, what):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=what):
        preprocess([str(bad)], str(tmp_path / "out"), ByteTokenizer())


def test_the_command_says_the_input_error_without_a_traceback(tmp_path, capsys):
    from megatron_wesar.data.preprocess import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n"just a string"\n')
    assert main(["--input", str(bad), "--output-prefix", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"megatron-wesar preprocess: {bad}:2: not a JSON object "
                                       "(a str)\n")
    assert not list(tmp_path.glob("out*"))


def test_a_text_file_that_is_not_utf8_names_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("first\n\nsecond é\nthird \xff".encode("latin-1", "surrogateescape"))
    with pytest.raises(ValueError, match=r"bad\.txt:3: not UTF-8 \(byte 0xe9 at column 8\)"):
        preprocess([str(bad)], str(tmp_path / "out"), ByteTokenizer())


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, file, what", [
    (lambda p: _truncate(p + ".idx", 20), ".idx", "truncated: 20 bytes"),
    (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), ".idx", "truncated"),
    (lambda p: _truncate(p + ".bin", 100), ".bin", "100 bytes, but .*short by"),
    (lambda p: _truncate(p + ".bin", os.path.getsize(p + ".bin") - 1001), ".bin",
     r".*\(short by 1001\)"),
], ids=["idx-header-cut", "idx-arrays-cut", "bin-cut", "bin-short-by-1001"])
def test_a_damaged_pair_fails_when_opened_naming_the_file(prefix, damage, file, what):
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=f"{prefix}{file}: {what}"):
        _open(prefix)


def test_a_pair_from_two_runs_fails_when_opened(tmp_path, prefix):
    other = str(tmp_path / "other")
    preprocess([_jsonl(tmp_path / "few.jsonl", DOCS[:5])], other, ByteTokenizer())
    os.replace(other + ".idx", prefix + ".idx")  # a new .idx next to the old .bin
    with pytest.raises(IndexedDatasetError, match=f"{prefix}.bin: .*the pair does not match"):
        _open(prefix)


def test_inspect_counts_documents_and_tokens(prefix):
    files = inspect_indexed_dataset(prefix)
    assert files.documents == files.sequences == len(DOCS)
    assert files.tokens == sum(len(d) + 1 for d in DOCS)
    assert os.path.getsize(prefix + ".bin") == 2 * files.tokens  # uint16 tokens


def test_a_prefix_preprocessed_again_does_not_reuse_the_stale_index_cache(tmp_path, prefix):
    _open(prefix).train_batch(15, 4)  # caches the sample indices next to the data (the default)
    fresh = [f"new text {i} " + "zebra " * 40 for i in range(6)]  # fewer, other documents
    preprocess([_jsonl(tmp_path / "new.jsonl", fresh)], prefix, ByteTokenizer())
    data = _open(prefix)
    for step in range(16):
        text = ByteTokenizer().detokenize(data.train_batch(step, 4)["tokens"].flatten().tolist())
        assert "lorem" not in text and "zebra" in text

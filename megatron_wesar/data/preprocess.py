"""`megatron-wesar preprocess`: text or JSONL files into a Megatron indexed dataset (.bin/.idx).

Each line of a JSONL file is one document (its `--json-key` field, a string); a text file is one
document per blank-line-separated paragraph block, or the whole file with `--whole-file`. Every
document is tokenized and ends with the tokenizer's end-of-document token. Input must be UTF-8;
every input error names the file and line.

The pair is written under temporary names next to the output (`<prefix>.tmp<pid>.bin/.idx`,
removed on failure; only a killed run leaves them behind) and renamed into place only once
complete, so a failed run leaves an existing pair at the prefix untouched. (Between the two
renames the old .idx briefly sits next to the new .bin; opening the data checks the pair and
names such a mismatch.) megatron's sample-index cache is keyed by the .idx content
(`versioned_gpt`), so a prefix written again is not paired with indices cached for its old
content.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from .tokenizers import build_tokenizer

OUTPUT_SUFFIXES = (".bin", ".idx")


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, read with surrogateescape


def _utf8(text: str, path: str, first_line: int = 1) -> str:
    """`text` (read from line `first_line` of `path` with errors="surrogateescape") when it was
    valid UTF-8; else a ValueError naming the file, line and column of the first bad byte."""
    bad = _NOT_UTF8.search(text)
    if bad is None:
        return text
    start = bad.start()
    line = first_line + text.count("\n", 0, start)
    column = start - text.rfind("\n", 0, start)
    raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{ord(bad.group()) - 0xdc00:02x} at "
                     f"column {column})")


def _jsonl_documents(path: str, json_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            line = _utf8(line, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: not a JSON object (a {type(record).__name__})")
            if json_key not in record:
                raise ValueError(f"{where}: no '{json_key}' field")
            if not isinstance(record[json_key], str):
                raise ValueError(f"{where}: the '{json_key}' field is a "
                                 f"{type(record[json_key]).__name__}, not a string")
            yield record[json_key]


def iter_documents(path: str, json_key: str = "text", whole_file: bool = False) -> Iterator[str]:
    """Documents of a .jsonl file (one JSON object per line) or of a text file; ValueError
    naming the file and line on bad input."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if path.endswith((".jsonl", ".json")):
        yield from _jsonl_documents(path, json_key)
        return
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = _utf8(f.read(), path)
    if whole_file:
        yield text
        return
    for block in text.split("\n\n"):
        if block.strip():
            yield block


def _write(inputs: list[str], prefix: str, tokenizer, json_key: str, whole_file: bool) -> dict:
    """Write the pair `prefix`.bin/.idx; return the counts."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    documents = tokens = 0
    try:
        for path in inputs:
            for text in iter_documents(path, json_key, whole_file):
                ids = tokenizer.tokenize(text) + [tokenizer.eod]
                builder.add_document(ids, [len(ids)])
                documents += 1
                tokens += len(ids)
        if documents == 0:
            raise ValueError(f"no documents found in {inputs}")
    except BaseException:
        builder.data_file.close()
        raise
    builder.finalize(prefix + ".idx")
    return {"documents": documents, "tokens": tokens}


def preprocess(inputs: list[str], output_prefix: str, tokenizer, json_key: str = "text",
               whole_file: bool = False) -> dict:
    """Write `output_prefix`.bin/.idx from the documents of `inputs` (renamed into place only on
    success); return counts."""
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    temporary = f"{output_prefix}.tmp{os.getpid()}"
    try:
        counts = _write(inputs, temporary, tokenizer, json_key, whole_file)
        for suffix in OUTPUT_SUFFIXES:
            os.replace(temporary + suffix, output_prefix + suffix)
    finally:
        for suffix in OUTPUT_SUFFIXES:
            if os.path.exists(temporary + suffix):
                os.remove(temporary + suffix)
    return counts


def main(argv=None) -> int:
    """Entry point of `megatron-wesar preprocess` (exit 1 with the error's message on bad
    input)."""
    parser = argparse.ArgumentParser(prog="megatron-wesar preprocess", description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--whole-file", action="store_true",
                        help="a text file is one document (default: blank-line separated)")
    parser.add_argument("--tokenizer-file", default=None,
                        help="a Hugging Face tokenizer.json (default: byte-level tokenizer)")
    args = parser.parse_args(argv)
    try:
        counts = preprocess(args.input, args.output_prefix, build_tokenizer(args.tokenizer_file),
                            args.json_key, args.whole_file)
    except (OSError, ValueError) as err:  # they name the file (and line)
        print(f"megatron-wesar preprocess: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
          f"{counts['tokens']} tokens")
    return 0

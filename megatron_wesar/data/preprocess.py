"""`megatron-wesar preprocess`: text or JSONL files into a Megatron indexed dataset (.bin/.idx).

Each line of a JSONL file is one document (its `--json-key` field); a text file is one document
per blank-line-separated paragraph block, or the whole file with `--whole-file`. Every document is
tokenized and ends with the tokenizer's end-of-document token.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from .tokenizers import build_tokenizer


def iter_documents(path: str, json_key: str = "text", whole_file: bool = False) -> Iterator[str]:
    """Documents of a .jsonl file (one JSON object per line) or of a text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                if json_key not in record:
                    raise ValueError(f"{path}:{number}: no '{json_key}' field")
                yield record[json_key]
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if whole_file:
        yield text
        return
    for block in text.split("\n\n"):
        if block.strip():
            yield block


def preprocess(inputs: list[str], output_prefix: str, tokenizer, json_key: str = "text",
               whole_file: bool = False) -> dict:
    """Write `output_prefix`.bin/.idx from the documents of `inputs`; return counts."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    documents = tokens = 0
    for path in inputs:
        for text in iter_documents(path, json_key, whole_file):
            ids = tokenizer.tokenize(text) + [tokenizer.eod]
            builder.add_document(ids, [len(ids)])
            documents += 1
            tokens += len(ids)
    if documents == 0:
        raise ValueError(f"no documents found in {inputs}")
    builder.finalize(output_prefix + ".idx")
    return {"documents": documents, "tokens": tokens}


def main(argv=None) -> int:
    """Entry point of `megatron-wesar preprocess`."""
    parser = argparse.ArgumentParser(prog="megatron-wesar preprocess", description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--whole-file", action="store_true",
                        help="a text file is one document (default: blank-line separated)")
    parser.add_argument("--tokenizer-file", default=None,
                        help="a Hugging Face tokenizer.json (default: byte-level tokenizer)")
    args = parser.parse_args(argv)
    counts = preprocess(args.input, args.output_prefix, build_tokenizer(args.tokenizer_file),
                        args.json_key, args.whole_file)
    print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
          f"{counts['tokens']} tokens")
    return 0

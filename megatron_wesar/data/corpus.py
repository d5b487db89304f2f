"""The embedded default corpus: text already on every machine with Python, as byte tokens.

The standard library's documentation topics (`pydoc_data.topics`) followed by the top-level
standard-library `.py` sources in sorted order, encoded as UTF-8 bytes (vocabulary 256). A fixed
split holds out every 20th 1 KiB block for validation, so the split never depends on the run.
"""
from __future__ import annotations

import pathlib
import sysconfig
from dataclasses import dataclass

import numpy as np

BYTE_VOCAB_SIZE = 256
BLOCK_BYTES = 1024
HELD_OUT_EVERY = 20


def embedded_corpus_bytes(max_bytes: int | None = None) -> bytes:
    """The corpus bytes (deterministic for a given Python installation)."""
    import pydoc_data.topics

    parts = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    text = "\n".join(parts).encode("utf-8")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks = [text]
    size = len(text)
    for path in sorted(stdlib.glob("*.py")):
        if max_bytes is not None and size >= max_bytes:
            break
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
    corpus = b"\n".join(chunks)
    return corpus if max_bytes is None else corpus[:max_bytes]


@dataclass(frozen=True)
class TokenSplit:
    """Train and validation token arrays (uint8 byte ids)."""

    train: np.ndarray
    valid: np.ndarray


def split_tokens(data: bytes) -> TokenSplit:
    """Every HELD_OUT_EVERY-th BLOCK_BYTES block goes to validation, the rest to training."""
    tokens = np.frombuffer(data, dtype=np.uint8)
    blocks = np.arange(len(tokens)) // BLOCK_BYTES
    held_out = blocks % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return TokenSplit(train=tokens[~held_out].copy(), valid=tokens[held_out].copy())

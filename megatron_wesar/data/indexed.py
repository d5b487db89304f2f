"""Megatron indexed dataset files (.bin/.idx): their consistency check and their identity.

`inspect_indexed_dataset(prefix)` reads the .idx (megatron-core's `_IndexWriter` layout: the
header b"MMIDIDX\\x00\\x00", version 1, a dtype code, the sequence and document counts, then
int32 sequence lengths, int64 byte pointers and int64 document indices) and checks it against the
.bin: the .idx parses and is complete, the pointers follow the lengths, the documents partition
the sequences, and the .bin holds exactly the bytes the .idx describes. Any mismatch raises
`IndexedDatasetError` naming the file and what is wrong, so that a damaged or mismatched pair
fails when the data is opened rather than at some later step.

The returned `digest` (of the .idx bytes) is the pair's identity for megatron's sample-index
cache: the cached indices depend on the .idx alone (document and sequence lengths), so two .idx
files with the same digest share them and a re-preprocessed prefix never meets the indices
cached for its earlier content.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

IDX_HEADER = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: code -> token dtype
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                7: np.float32, 8: np.uint16}
_PREAMBLE = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequences, documents
REMEDY = "write the pair again with `megatron-wesar preprocess`"


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is damaged or does not match."""


@dataclass(frozen=True)
class IndexedFiles:
    """What a consistent .bin/.idx pair holds."""

    prefix: str
    documents: int
    sequences: int
    tokens: int
    digest: str  # sha256 of the .idx


def _fail(path: str, what: str) -> IndexedDatasetError:
    return IndexedDatasetError(f"{path}: {what}; {REMEDY}")


def inspect_indexed_dataset(prefix: str) -> IndexedFiles:
    """Check the pair `prefix`.bin/.idx (FileNotFoundError when one is missing,
    IndexedDatasetError when they are damaged or inconsistent) and return what it holds."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (write it with `megatron-wesar preprocess`)")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        preamble = f.read(_PREAMBLE.size)
        digest = hashlib.sha256(preamble)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if len(preamble) < _PREAMBLE.size:
        raise _fail(idx_path, f"truncated: {idx_size} bytes, shorter than the "
                              f"{_PREAMBLE.size}-byte header")
    header, version, code, sequences, documents = _PREAMBLE.unpack(preamble)
    if header != IDX_HEADER:
        raise _fail(idx_path, "not a Megatron index file (bad header)")
    if version != IDX_VERSION:
        raise _fail(idx_path, f"index version {version}, expected {IDX_VERSION}")
    if code not in TOKEN_DTYPES:
        raise _fail(idx_path, f"unknown token dtype code {code}")
    needed = _PREAMBLE.size + 12 * sequences + 8 * documents
    if idx_size < needed:
        raise _fail(idx_path, f"truncated: {idx_size} bytes, its counts ({sequences} sequences, "
                              f"{documents - 1} documents) need {needed}")
    lengths = np.fromfile(idx_path, np.int32, sequences, offset=_PREAMBLE.size)
    pointers = np.fromfile(idx_path, np.int64, sequences, offset=_PREAMBLE.size + 4 * sequences)
    doc_index = np.fromfile(idx_path, np.int64, documents,
                            offset=_PREAMBLE.size + 12 * sequences)
    itemsize = np.dtype(TOKEN_DTYPES[code]).itemsize
    if sequences and (np.any(lengths < 0) or pointers[0] != 0
                      or np.any(np.diff(pointers) != lengths[:-1].astype(np.int64) * itemsize)):
        raise _fail(idx_path, "sequence lengths and byte pointers disagree")
    if documents < 2 or doc_index[0] != 0 or doc_index[-1] != sequences \
            or np.any(np.diff(doc_index) < 0):
        raise _fail(idx_path, f"its {max(documents - 1, 0)} document(s) do not partition its "
                              f"{sequences} sequences")
    tokens = int(lengths.sum(dtype=np.int64))
    bin_size, expected = os.path.getsize(bin_path), tokens * itemsize
    if bin_size != expected:
        gap = f"short by {expected - bin_size}" if bin_size < expected else \
            f"{bin_size - expected} too many"
        raise _fail(bin_path, f"{bin_size} bytes, but {idx_path} describes {tokens} tokens of "
                              f"{itemsize} byte(s) = {expected} bytes ({gap}); the pair does "
                              "not match")
    return IndexedFiles(prefix, documents - 1, sequences, tokens, digest.hexdigest())

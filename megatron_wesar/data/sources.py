"""Training and validation batches, the same on every parallel layout and on resume.

A source returns the whole global batch of an optimizer step as stacked samples
{tokens, labels, loss_mask, position_ids} ([global batch, seq]); `microbatches` cuts out this
data-parallel rank's share. Batches are a pure function of (seed, step), so a resumed run sees
exactly the batches it would have seen.

- `EmbeddedCorpus`: random windows of the embedded byte corpus (train or held-out split).
- `IndexedDatasets`: megatron-core GPTDatasets over Megatron indexed datasets (.bin/.idx),
  blended, split into train and validation by megatron's builder. Every .bin/.idx pair is checked
  when opened (`indexed.inspect_indexed_dataset`), and megatron's sample-index cache (by default
  `<prefix>/cache/`, else --data-cache-path) is keyed by the digests of the .idx files, so a
  prefix written again by `preprocess` never reuses the indices cached for its old content.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..coordination import on_rank0
from .corpus import BYTE_VOCAB_SIZE, embedded_corpus_bytes, split_tokens
from .indexed import inspect_indexed_dataset

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def windows_to_batch(windows: torch.Tensor) -> dict:
    """[n, seq + 1] token windows as GPT inputs: next-token labels, full loss mask."""
    tokens, labels = windows[:, :-1], windows[:, 1:]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
        "position_ids": positions,
    }


def microbatches(batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int) -> Iterator[dict]:
    """This data-parallel rank's microbatches of a global batch."""
    rows = batch["tokens"].shape[0]
    if rows % (dp_size * micro_batch_size):
        raise ValueError(f"global batch of {rows} is not divisible by DP {dp_size} x micro "
                         f"batch {micro_batch_size}")
    per_rank = rows // dp_size
    start = dp_rank * per_rank
    for offset in range(start, start + per_rank, micro_batch_size):
        yield {k: batch[k][offset : offset + micro_batch_size] for k in BATCH_KEYS}


class EmbeddedCorpus:
    """The embedded byte corpus: random windows, drawn from (seed, step)."""

    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, seq_length: int, seed: int, max_bytes: int | None = None):
        split = split_tokens(embedded_corpus_bytes(max_bytes))
        self.train, self.valid = split.train, split.valid
        self.seq_length, self.seed = seq_length, seed
        for name, tokens in (("train", self.train), ("validation", self.valid)):
            if len(tokens) <= seq_length + 1:
                raise ValueError(f"embedded corpus {name} split ({len(tokens)} tokens) is shorter "
                                 f"than a sequence of {seq_length}")

    def _windows(self, tokens: np.ndarray, rng_key, count: int) -> dict:
        rng = np.random.default_rng(rng_key)
        starts = rng.integers(0, len(tokens) - self.seq_length - 1, size=count)
        windows = np.stack([tokens[s : s + self.seq_length + 1] for s in starts])
        return windows_to_batch(torch.from_numpy(windows.astype(np.int64)))

    def train_batch(self, step: int, global_batch_size: int) -> dict:
        """The global batch of optimizer step `step`."""
        return self._windows(self.train, [self.seed, step], global_batch_size)

    def valid_batch(self, index: int, global_batch_size: int) -> dict:
        """Validation batch `index` (the same at every evaluation)."""
        return self._windows(self.valid, [self.seed, 1 << 30, index], global_batch_size)


class IndexedDatasets:
    """megatron-core GPTDatasets over blended Megatron indexed datasets; every .bin/.idx pair is
    checked first (FileNotFoundError, indexed.IndexedDatasetError naming the file)."""

    def __init__(self, data_path: list[str], split: str, seq_length: int, seed: int, tokenizer,
                 train_samples: int, valid_samples: int, cache_dir: str | None = None):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.utils import get_blend_from_list

        from .versioned_gpt import VersionedGPTDataset, VersionedGPTDatasetConfig

        blend = get_blend_from_list(data_path)

        def inspect() -> list:
            return [inspect_indexed_dataset(prefix) for prefix in blend[0]]

        files = on_rank0(inspect) if dist.is_initialized() else inspect()  # one rank reads
        config = VersionedGPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=blend,
            split=split,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            path_to_cache=cache_dir,
            index_digests={f.prefix: f.digest for f in files},
        )
        # the test split is never read: size 0 (megatron refuses None with blend weights)
        builder = BlendedMegatronDatasetBuilder(
            VersionedGPTDataset, [train_samples, valid_samples, 0], lambda: True, config
        )
        # rank 0 builds (and caches) the sample indices first, the others then read them
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            datasets = builder.build()
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:
            datasets = builder.build()
        self.train, self.valid = datasets[0], datasets[1]
        if self.valid is None:
            raise ValueError(f"--split {split!r} leaves no validation data")
        self.vocab_size = tokenizer.vocab_size

    @staticmethod
    def _stack(dataset, first: int, count: int) -> dict:
        samples = [dataset[(first + i) % len(dataset)] for i in range(count)]
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}

    def train_batch(self, step: int, global_batch_size: int) -> dict:
        """The global batch of optimizer step `step` (samples in the builder's shuffled order)."""
        return self._stack(self.train, step * global_batch_size, global_batch_size)

    def valid_batch(self, index: int, global_batch_size: int) -> dict:
        """Validation batch `index`."""
        return self._stack(self.valid, index * global_batch_size, global_batch_size)

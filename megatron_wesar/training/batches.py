"""Microbatches of fixed-length windows drawn from a token array, the same on every layout.

Step `t` draws `global_batch_size` windows with a generator seeded by (seed, t); data-parallel
rank r takes its contiguous share and cuts it into microbatches. So a run's data does not depend
on TP, PP or DP, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def global_batch(tokens: np.ndarray, seq_length: int, global_batch_size: int, seed: int,
                 step: int) -> torch.Tensor:
    """[global_batch_size, seq_length + 1] windows of `tokens` for optimizer step `step`."""
    if len(tokens) <= seq_length + 1:
        raise ValueError(f"corpus of {len(tokens)} tokens is shorter than a sequence of {seq_length}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_length - 1, size=global_batch_size)
    windows = np.stack([tokens[s : s + seq_length + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows)


def microbatches(batch: torch.Tensor, dp_rank: int, dp_size: int,
                 micro_batch_size: int) -> Iterator[dict]:
    """This data-parallel rank's microbatches of `batch` as GPT inputs."""
    per_rank = batch.shape[0] // dp_size
    mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    seq_length = batch.shape[1] - 1
    positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1)
    for tokens in mine.split(micro_batch_size):
        yield {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(tokens.shape[0], seq_length),
            "position_ids": positions,
        }

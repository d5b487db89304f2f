"""megatron-core's GPTDataset with its sample-index cache keyed by the data's identity.

megatron-core 0.16.1 caches a GPTDataset's document, sample and shuffle indices under a hash of
the dataset path, sample count, split and a few config fields (`path_to_cache`, by default
`<prefix>/cache/<class>_indices`), not of the data: a prefix written again with other documents
would be paired with the indices of its old content (an IndexError, or silently wrong samples).
Here the digests of the .idx files (`indexed.inspect_indexed_dataset`) join that key, so new
content gets new cache files and unchanged content keeps its cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig


@dataclass
class VersionedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig that carries {prefix: .idx digest} of every blended prefix."""

    index_digests: dict = field(default_factory=dict)


class VersionedGPTDataset(GPTDataset):
    """GPTDataset whose cache key includes the .idx digests of the config."""

    @staticmethod
    def _key_config_attributes() -> list:
        """megatron's key attributes and the .idx digests."""
        return [*GPTDataset._key_config_attributes(), "index_digests"]

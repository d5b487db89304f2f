"""Data: tokenizers, `megatron-wesar preprocess`, and the training data sources."""

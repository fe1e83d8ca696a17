"""Data: rows in files -> chat messages (formats) -> token ids + labels (template) -> batches (batching)."""

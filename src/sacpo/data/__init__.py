"""Data: canonical records, loaders with precise errors, tokenization and batching."""

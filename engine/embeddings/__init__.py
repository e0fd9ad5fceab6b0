"""Embeddings: vectors for texts or token ids, batched across requests."""

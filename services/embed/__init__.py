"""Embedding worker: text to vectors, with dynamic batching."""

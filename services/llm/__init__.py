"""LLM worker: serves generation streams on the bus from one engine."""

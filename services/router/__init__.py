"""Alias router: serves infer.<kind>.<model> by the registry's traffic policy."""

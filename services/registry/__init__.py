"""Model registry: versions, traffic policy, audit, canary controller."""

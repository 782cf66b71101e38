"""InferBus services: the edge gateway, workers and the control plane."""

"""Fake upstreams for tests: in-process or as a subprocess."""

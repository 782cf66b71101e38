"""Runtime shared by every service: settings, logging, metrics, bus, lifecycle, streaming client."""

"""The ops CLI: `inferbus up | status | keys`."""

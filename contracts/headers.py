"""Header names that carry cross-cutting data on the bus."""

from typing import Final

REQUEST_ID: Final = "Inferbus-Request-Id"
TRACEPARENT: Final = "traceparent"
KEY_ID: Final = "Inferbus-Key-Id"
TENANT: Final = "Inferbus-Tenant"
# Absolute deadline, Unix epoch milliseconds.
DEADLINE: Final = "Inferbus-Deadline"
# A caller that sets it ("1") takes several chunks in one message (contracts.llm.Bundle).
BUNDLE: Final = "Inferbus-Bundle"
STATUS: Final = "Status"
NO_RESPONDERS: Final = "503"

"""Header names that carry cross-cutting data on the bus."""

from typing import Final

REQUEST_ID: Final = "Inferbus-Request-Id"
TRACEPARENT: Final = "traceparent"
KEY_ID: Final = "Inferbus-Key-Id"
TENANT: Final = "Inferbus-Tenant"
# Absolute deadline, Unix epoch milliseconds.
DEADLINE: Final = "Inferbus-Deadline"
STATUS: Final = "Status"
NO_RESPONDERS: Final = "503"

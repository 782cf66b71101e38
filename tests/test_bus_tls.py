"""NATS over TLS with the local CA that `inferbus up` makes (INFERBUS_NATS_TLS=1): services and clients connect."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import nats
import nats.errors
import pytest

from services.runtime import bus
from services.runtime.local import EmbeddedStack, wait_worker
from tests.conftest import stack_in_tempdir, start_worker

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[EmbeddedStack]:
    with stack_in_tempdir("inferbus-tls-", tls=True) as stack:
        yield stack


async def test_services_and_clients_speak_tls(tls_stack: EmbeddedStack) -> None:
    nc = await bus.connect(tls_stack.nats_url, "tls-test", identity=tls_stack.identity())
    try:
        assert nc.is_connected and nc.connected_url is not None
        worker = start_worker(tls_stack, "tls-model")
        try:
            stats = await wait_worker(nc, "tls-model", worker)  # the worker connected over TLS with its role
            assert stats["ready"]
        finally:
            worker.stop()
    finally:
        await nc.close()


async def test_plaintext_and_unknown_ca_are_refused(tls_stack: EmbeddedStack) -> None:
    user, password = bus.Identity(str(tls_stack.nats.secrets.credentials("operator"))).options()["user"], \
        bus.Identity(str(tls_stack.nats.secrets.credentials("operator"))).options()["password"]
    with pytest.raises(Exception):  # noqa: B017 - the server demands TLS: nats-py fails the handshake
        await nats.connect(tls_stack.nats_url, user=user, password=password, allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=3)
    with pytest.raises(ssl.SSLError):
        await nats.connect(tls_stack.nats_url, user=user, password=password, tls=ssl.create_default_context(),
                           allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)

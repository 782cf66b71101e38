"""The NATS front door: API-key clients authenticated by auth callout, their requests admitted like HTTP ones.

- `Callout` answers nats-server's authorization requests: the client's token must be a live InferBus
  key; its user JWT (named after the key id) may publish only the inference subjects its scopes allow
  and hear only its own inbox prefix.
- `Edge` serves what those clients publish (`infer.<kind>.<model>` in CLIENTS arrives here as
  `edge.<kind>.<model>`, stamped by the server with the caller's identity). Identity comes from that
  stamp, never from a header the client set; the request gets scopes, limits, budgets, a
  platform-minted request id, the registry's routing, outcomes and usage under its key and tenant.
- `Kicker` closes a revoked (or changed) key's connections through the system account.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import msgspec
from prometheus_client import Counter

from contracts import headers as h
from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import (
    Accepted,
    Chunk,
    ErrorChunk,
    GenerateRequest,
    check_generate,
    chunk_encoder,
    request_decoder,
)
from services.gateway.auth import KeyRecord, KeyStore
from services.runtime import bus, natsauth
from services.runtime import logging as log

AUTH = Counter("inferbus_nats_auth_total", "NATS client authentications by auth callout", ["decision", "reason"])
EDGE = Counter("inferbus_nats_edge_requests_total", "Requests from NATS clients at the edge", ["outcome"])
KICKS = Counter("inferbus_nats_kicked_total", "NATS client connections closed (key revoked or changed)")

MAX_TOKENS = 1 << 17
EDGE_KINDS = ("llm",)  # speech and embeddings over NATS go through HTTP for now (see README)


class Callout:
    """nats-server's auth callout responder (queue group: any gateway replica answers)."""

    def __init__(self, keys: KeyStore, issuer: natsauth.Issuer) -> None:
        self.keys = keys
        self.issuer = issuer
        self.logger = log.get("nats-auth")

    async def start(self, nc: bus.Connection) -> None:
        await nc.subscribe(natsauth.CALLOUT_SUBJECT, queue="inferbus-auth", cb=self._on_request)
        await nc.flush()

    async def _on_request(self, msg: Any) -> None:
        try:
            request = natsauth.parse_callout(msg.data)
        except natsauth.CalloutError as exc:
            AUTH.labels("refused", "malformed").inc()
            self.logger.warning("nats_auth_refused", reason="malformed", error=str(exc))
            return
        answer = await self.decide(request)
        await msg.respond(answer)

    async def decide(self, request: natsauth.CalloutRequest) -> bytes:
        host = request.client.get("host", "")
        if not request.token:
            return self._refuse(request, "no_key", "an InferBus API key is required (connect with token=<key>)", host)
        try:
            key = await self.keys.authenticate(request.token)
        except InferBusError as exc:
            return self._refuse(request, "invalid_key", exc.message, host)
        except Exception as exc:  # PostgreSQL down: refuse now, the client reconnects
            return self._refuse(request, "unavailable", f"key lookup failed: {type(exc).__name__}", host)
        permissions = natsauth.client_permissions(key.scopes, request.token)
        jwt = self.issuer.user_jwt(request.user_nkey, key.id, permissions, key.expires_at)
        AUTH.labels("accepted", "-").inc()
        self.logger.info("nats_client_authenticated", key_id=key.id, tenant=key.tenant_id, host=host)
        return self.issuer.response(request, user_jwt=jwt)

    def _refuse(self, request: natsauth.CalloutRequest, reason: str, message: str, host: str) -> bytes:
        AUTH.labels("refused", reason).inc()
        self.logger.warning("nats_auth_refused", reason=reason, host=host)  # never the key
        return self.issuer.response(request, error=message)


class Kicker:
    """Closes every connection of a key, on every server of the cluster (system account requests)."""

    def __init__(self, nc: bus.Connection) -> None:
        self.nc = nc
        self.logger = log.get("nats-auth")

    async def kick(self, key_id: str) -> int:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        found: list[tuple[str, int]] = []
        try:
            query = {"acc": natsauth.CLIENTS, "auth": True, "limit": 100_000}
            await self.nc.publish("$SYS.REQ.SERVER.PING.CONNZ", json.dumps(query).encode(), reply=inbox)
            deadline = time.monotonic() + 0.25  # every server of a cluster answers within this
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except Exception:  # nats TimeoutError: no more servers
                    break
                reply = json.loads(msg.data)
                server = reply.get("server", {}).get("id", "")
                for conn in (reply.get("data") or {}).get("connections") or []:
                    if conn.get("authorized_user") == key_id:
                        found.append((server, int(conn["cid"])))
        finally:
            await sub.unsubscribe()
        for server, cid in found:
            try:
                await self.nc.request(f"$SYS.REQ.SERVER.{server}.KICK", json.dumps({"cid": cid}).encode(), timeout=1)
                KICKS.inc()
            except Exception as exc:  # gone already
                self.logger.debug("kick_failed", cid=cid, error=repr(exc))
        if found:
            self.logger.info("nats_connections_closed", key_id=key_id, connections=len(found))
        return len(found)


def check_request(req: GenerateRequest) -> None:
    """What the HTTP routes check on their way to a GenerateRequest, for requests that arrive ready-made."""
    if not req.model:
        raise InferBusError("invalid_request", "model must not be empty", param="model")
    if (req.messages is None) == (req.prompt is None):
        raise InferBusError("invalid_request", "send either messages or prompt", param="messages")
    if req.messages is not None and not req.messages:
        raise InferBusError("invalid_request", "messages must hold at least one message", param="messages")
    if not 0 < req.max_tokens <= MAX_TOKENS:
        raise InferBusError("invalid_request", f"max_tokens must be in 1..{MAX_TOKENS}", param="max_tokens")
    if not 0.0 <= req.temperature <= 2.0:  # NaN fails too
        raise InferBusError("invalid_request", "temperature must be in [0, 2]", param="temperature")
    if not 0.0 < req.top_p <= 1.0:
        raise InferBusError("invalid_request", "top_p must be in (0, 1]", param="top_p")
    if len(req.stop) > 4 or any(not s for s in req.stop):
        raise InferBusError("invalid_request", "stop may hold at most 4 non-empty sequences", param="stop")
    check_generate(req)  # tools, tool messages and response formats, as the HTTP routes check them


class Edge:
    """Serves API-key clients' requests (queue group across gateways); cancels by the client's own id."""

    def __init__(self, gateway: Any) -> None:
        self.gw = gateway
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}  # (key id, client's id) -> stream
        self._tasks: set[asyncio.Task[None]] = set()  # every request's task, until it ends
        self.logger = log.get("nats-edge")

    async def start(self, nc: bus.Connection) -> None:
        for kind in sorted(subjects.KINDS):
            await nc.subscribe(f"{natsauth.EDGE_PREFIX}.{kind}.*", queue="inferbus-edge", cb=self._on_request)
        await nc.subscribe(f"{natsauth.EDGE_PREFIX}.cancel.*", cb=self._on_cancel)
        await nc.flush()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_request(self, msg: Any) -> None:
        if not msg.reply:
            EDGE.labels("no_reply").inc()
            return
        # A task per request: nats-py runs one subscription's callbacks one at a time.
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Any) -> None:
        nc = self.gw.service.bus
        seq = 0
        slot: tuple[str, str] | None = None
        try:
            key, request = await self._admit_identity(msg)
            slot = (key.id, subjects.token(request.request_id))
            if slot in self.running:
                raise InferBusError("invalid_request", "a request with this id is already running", param="request_id")
            current = asyncio.current_task()
            assert current is not None
            self.running[slot] = current
            platform_id = "nats-" + secrets.token_hex(12)
            gen = msgspec.structs.replace(request, request_id=platform_id, shadow=False)
            with log.bound(request_id=platform_id, model=gen.model, key_id=key.id):
                async for chunk in self._generate(key, gen):
                    out = msgspec.structs.replace(chunk, seq=seq)
                    seq += 1
                    hdrs = {h.REQUEST_ID: platform_id} if isinstance(chunk, Accepted) else None
                    await nc.publish(msg.reply, chunk_encoder.encode(out), headers=hdrs)
            EDGE.labels("ok").inc()
        except InferBusError as exc:
            EDGE.labels(exc.code).inc()
            self.logger.info("nats_edge_refused", code=exc.code, subject=msg.subject,
                             key_id=slot[0] if slot else None)  # never the key itself
            await nc.publish(msg.reply, chunk_encoder.encode(ErrorChunk(seq, exc.code, exc.message)))
        except asyncio.CancelledError:
            EDGE.labels("cancelled").inc()
            if not nc.is_closed:
                await nc.publish(msg.reply, chunk_encoder.encode(ErrorChunk(seq, "cancelled", "cancelled by client")))
        except Exception as exc:  # never let one request take the edge down
            EDGE.labels("internal_error").inc()
            self.logger.exception("edge_failed", error=repr(exc))
            await nc.publish(msg.reply, chunk_encoder.encode(ErrorChunk(seq, "internal_error", "internal error")))
        finally:
            if slot is not None and self.running.get(slot) is asyncio.current_task():
                del self.running[slot]

    async def _admit_identity(self, msg: Any) -> tuple[KeyRecord, GenerateRequest]:
        info = natsauth.request_info(msg.headers)
        if info is None or info.account != natsauth.CLIENTS or not info.user:
            raise InferBusError("permission_denied", "requests must come from an authenticated NATS client")
        key: KeyRecord = await self.gw.keys.by_id(info.user)
        _, kind, model = msg.subject.split(".", 2)
        if kind not in EDGE_KINDS:
            raise InferBusError("unsupported_parameter", f"{kind} requests over NATS are not served yet: use HTTP",
                                param="model")
        try:
            request = request_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise InferBusError("invalid_request", f"the request is not a GenerateRequest: {exc}") from None
        if subjects.token(request.model) != model:
            raise InferBusError("invalid_request", f"the subject names '{model}', the request '{request.model}'",
                                param="model")
        check_request(request)
        key.authorize(kind, request.model)
        return key, request

    async def _generate(self, key: KeyRecord, gen: GenerateRequest) -> Any:
        gw = self.gw
        grant = await gw.admit(key, "nats:infer.llm", gen)
        chunks = gw.dispatcher.generate(
            gen, kind="llm", timeout_s=gw.settings.request_timeout_s, headers=gw.bus_headers(None, key),
            key_id=key.id, affinity=gen.user,
        )
        if grant is not None:
            chunks = gw.governor.governed(key.id, grant, chunks, gen.model)
        try:
            chunk: Chunk
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def _on_cancel(self, msg: Any) -> None:
        info = natsauth.request_info(msg.headers)
        if info is None or info.account != natsauth.CLIENTS:
            return
        client_id = msg.subject.split(".", 2)[2]
        task = self.running.get((info.user, client_id))
        if task is not None:  # only the key that started it may cancel it
            task.cancel()

"""The batch service process: Files and Batch APIs, the work queue's runner, finalization, webhooks."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from contracts import subjects
from contracts.batch import (
    AdminListBatches,
    BatchRef,
    CreateBatch,
    FileRef,
    KeyRef,
    ListBatches,
    ListDeliveries,
    ListFiles,
    SetWebhook,
    UploadStart,
)
from contracts.control import load_decoder
from services.batch import lifecycle
from services.batch.api import Api, Uploads, sweep_files
from services.batch.execute import ExecClient
from services.batch.lifecycle import Lifecycle
from services.batch.objects import Objects
from services.batch.runner import Capacity, ResultWriter, Runner
from services.batch.store import Store
from services.batch.webhooks import Sender
from services.runtime import admin, bus, db, service, settings
from services.runtime import logging as log
from services.runtime.routing import Tables


class KnownModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model served without a registry table (as the gateway's `models` setting lists them)."""

    name: str
    version: str = ""
    kind: str = "llm"


class BatchSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    max_file_bytes: int = 200 * 1024 * 1024
    completion_windows: list[str] = msgspec.field(default_factory=lambda: ["24h"])  # OpenAI's only one
    file_expiry_s: float = 30 * 86400.0  # batch input and output files (OpenAI's default); 0: kept until deleted
    # Lines running at once: per batch, per tenant, and in this replica.
    batch_concurrency: int = 64
    tenant_concurrency: int = 128
    max_concurrency: int = 256
    ack_wait_s: float = 30.0  # a line a dead replica held runs again after this
    line_timeout_s: float = 600.0
    max_tries: int = 5  # runs of a line that failed retryably before it is answered with the error
    exec_silence_s: float = 5.0  # a gateway silent this long on a running line is gone
    sync_s: float = 1.0  # how often batches are looked at (expiry, cancels elsewhere, resumption)
    stop_grace_s: float = 1.0  # a cancelled or expired batch waits this long for other replicas' lines
    drain_s: float = 10.0  # on SIGTERM, running lines get this long to finish
    stream_max_age_s: float = 8 * 86400.0
    models: list[KnownModel] = msgspec.field(default_factory=list)
    webhook_allow_private: bool = False  # webhooks to private or loopback addresses (no SSRF by default)
    webhook_backoff_s: list[float] = msgspec.field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0,
                                                                               3600.0, 10800.0])
    webhook_timeout_s: float = 10.0
    upload_idle_s: float = 60.0


class BatchService:
    def __init__(self, cfg: BatchSettings) -> None:
        self.cfg = cfg
        self.service = service.Service("inferbus-batch", cfg, description="Files and Batch APIs, batch runner")
        self.tables = Tables()
        self.capacity = Capacity()
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.logger = log.get("batch")

    async def start(self) -> None:
        cfg = self.cfg
        await self.service.connect()
        nc = self.service.bus
        js = nc.jetstream()
        self.pool = await db.connect(cfg.database_url)
        applied = await db.migrate(self.pool, "services.batch", "batch")
        if applied:
            self.logger.info("migrations_applied", files=applied)
        self.store = Store(self.pool)
        self.objects = Objects(js)
        await self.objects.ensure()
        await lifecycle.ensure_stream(js, cfg.stream_max_age_s)
        await nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        try:
            await self.tables.watch(js)
        except Exception as exc:  # the registry never ran: configured models and live workers still count
            self.logger.warning("routing_tables_unavailable", error=repr(exc))
        self.execs = ExecClient(nc, silence_s=cfg.exec_silence_s)
        await self.execs.start()
        self.writer = ResultWriter(self.store, lambda counts: self.lifecycle.counts(counts))
        self.runner = Runner(nc, self.store, self.execs, self.capacity, self.writer, cfg)
        self.lifecycle = Lifecycle(nc, self.store, self.objects, self.runner, self.writer, cfg, self.known)
        self.uploads = Uploads(nc, self.objects, self.store, self.service.instance_id, cfg.max_file_bytes,
                               cfg.file_expiry_s)
        await self.uploads.start()
        self.api = Api(nc, self.store, self.objects, self.uploads, cfg, self.lifecycle.poke)
        self.sender = Sender(self.store, allow_private=cfg.webhook_allow_private, backoff_s=cfg.webhook_backoff_s,
                             timeout_s=cfg.webhook_timeout_s)
        await nc.subscribe(subjects.BATCH_CHANGED, cb=self._on_changed)
        self.writer.start()
        a = self.api
        api_ops: list[tuple[str, type[Any], Any]] = [
            ("files.upload", UploadStart, a.upload), ("files.get", FileRef, a.get_file),
            ("files.list", ListFiles, a.list_files), ("files.delete", FileRef, a.delete_file),
            ("batches.create", CreateBatch, a.create_batch), ("batches.get", BatchRef, a.get_batch),
            ("batches.list", ListBatches, a.list_batches), ("batches.cancel", BatchRef, a.cancel_batch),
        ]
        admin_ops: list[tuple[str, type[Any], Any]] = [
            ("batches.list", AdminListBatches, a.admin_batches), ("webhooks.set", SetWebhook, a.set_webhook),
            ("webhooks.list", KeyRef, a.webhooks), ("webhooks.delete", KeyRef, a.delete_webhook),
            ("deliveries.list", ListDeliveries, a.deliveries),
        ]
        handler = admin.handler
        endpoints: list[tuple[str, str, service.MicroHandler, str | None]] = [
            (f"api-{op.replace('.', '-')}", subjects.batch_api(op), handler(self.logger, typ, fn), "batch")
            for op, typ, fn in api_ops]
        endpoints += [(f"admin-{op.replace('.', '-')}", subjects.batch_admin(op), handler(self.logger, typ, fn),
                       "batch") for op, typ, fn in admin_ops]
        endpoints.append(("api-files-chunk", subjects.batch_api("files.chunk"), a.chunk, "batch"))
        self.service.stats_source = self.stats
        await self.service.register(endpoints)
        self._tasks = [asyncio.create_task(self.lifecycle.loop(self.stop), name="batch-lifecycle"),
                       asyncio.create_task(self.sender.loop(self.stop), name="batch-webhooks"),
                       asyncio.create_task(self._sweep(), name="batch-sweep")]

    def known(self, kind: str, model: str) -> bool:
        """Whether a batch may name `model` of `kind`: a registry table, a configured model, or a live worker
        serves it."""
        return (self.tables.get(kind, model) is not None
                or any(m.name == model and m.kind == kind for m in self.cfg.models)
                or bool(self.capacity.presence.live(kind, model)))

    async def _on_heartbeat(self, msg: bus.Msg) -> None:
        try:
            self.capacity.heard(load_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self.logger.warning("bad_heartbeat", subject=msg.subject)

    async def _on_changed(self, _: bus.Msg) -> None:
        self.lifecycle.poke()

    async def _sweep(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(5.0)
            rounds += 1
            try:
                await self.uploads.sweep(self.cfg.upload_idle_s)
                if rounds % 12 == 0:
                    expired = await sweep_files(self.store, self.objects)
                    if expired:
                        self.logger.info("files_expired", files=expired)
            except Exception as exc:  # try again next round
                self.logger.warning("sweep_failed", error=repr(exc))

    def stats(self) -> dict[str, Any]:
        return {"batches_running": len(self.runner.runs), "lines_running": self.runner.running(),
                "uploads": len(self.uploads.open)}

    async def close(self) -> None:
        self.stop.set()
        await self.runner.drain(self.cfg.drain_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lifecycle.close()
        await self.runner.close()
        await self.writer.close()
        await self.tables.close()
        await self.service.close()
        await self.pool.close()


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(BatchSettings, "batch")
    log.configure("batch", cfg.log_level)
    svc = BatchService(cfg)
    await svc.start()
    svc.logger.info("batch_ready", instance=svc.service.instance_id)
    await stop.wait()
    await svc.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()

"""Metering service: the USAGE stream into the PostgreSQL ledger, prices, usage queries over `metering.admin.*`,
and the request log (the REQUESTS stream into PostgreSQL, its retention, its queries)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import asyncpg
import msgspec
from faststream.nats import NatsBroker, NatsSecurity, NatsToken, NatsUserPassword

from contracts import requestlog as reqlog
from contracts import usage
from contracts.requestlog import RequestPage, RequestQuery, RetentionReport, RunRetention
from contracts.usage import DeadLetterReport, ListDeadLetters, ListPrices, PriceView, SetPrice, UsageQuery, UsageReport
from services.metering import deadletters, prices, query, requestlog
from services.metering.budgets import BudgetGauges
from services.metering.consumer import Consumer, ensure_consumer
from services.runtime import admin, bus, db, service, settings
from services.runtime import logging as log
from services.runtime.requestlog import ensure_stream as ensure_requests_stream
from services.runtime.usage import ensure_stream

QUEUE = "metering"


class MeteringSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    durable: str = "metering"  # the JetStream consumer: every replica shares it
    # Messages per fetch, and events per PostgreSQL transaction, at most (a worker's message may carry up to
    # contracts.usage.MAX_MESSAGE_EVENTS events: a fetch's events are committed in transactions of this many).
    batch_size: int = 1000
    batch_timeout_s: float = 0.05  # a batch is written when full or after this long
    ack_wait_s: float = 30.0  # an unacked batch (a replica died mid-write) is redelivered after this
    max_ack_pending: int = 20_000
    # Deliveries of one message before it goes to the dead letters. A database outage uses up none (the
    # batch is held and retried in place); only crashes mid-batch and unforeseen failures count.
    max_deliver: int = 20
    write_timeout_s: float = 20.0  # a commit taking longer counts as failed (the batch is retried in place)
    max_backoff_s: float = 5.0
    writers: int = 2  # batches committing at once (one PostgreSQL connection each)
    db_pool_size: int = 4  # the writers' connections plus the admin queries'
    drain_s: float = 10.0  # on SIGTERM, time the batches in hand get to commit and ack
    # The request log (REQUESTS stream): its consumer, and how long rows and bodies are kept.
    requestlog_durable: str = "requestlog"
    requestlog_batch_size: int = 64  # messages per fetch (each an edge flush of up to 256 records)
    requestlog_fetch_wait_s: float = 0.2  # longest wait for a batch when the stream is idle
    requestlog_ack_wait_s: float = 30.0
    requestlog_max_deliver: int = 20
    requestlog_retention_days: int = 30  # rows older than this are deleted (bodies go at their own expiry)
    requestlog_retention_interval_s: float = 3600.0
    budget_interval_s: float = 15.0  # how often the budget gauges (inferbus_budget_remaining) are refreshed


def broker_identity(identity: bus.Identity) -> dict[str, Any]:
    """The connection's identity as FastStream takes it (`security=`, not nats-py's keywords)."""
    opts = identity.options()
    tls = opts.pop("tls", None)
    security: NatsSecurity | None = None
    if "user" in opts:
        security = NatsUserPassword(opts.pop("user"), opts.pop("password"), ssl_context=tls)
    elif "token" in opts:
        security = NatsToken(opts.pop("token"), ssl_context=tls)
    elif tls is not None:
        security = NatsSecurity(ssl_context=tls)
    return {**opts, "security": security} if security is not None else opts


class Metering:
    def __init__(self, cfg: MeteringSettings) -> None:
        self.cfg = cfg
        self.service = service.Service("inferbus-metering", cfg, description="Usage ledger, prices, usage queries")
        self.broker: NatsBroker | None = None
        self._pool: asyncpg.Pool | None = None
        self._consumer: Consumer | None = None
        self._subscriber: Any = None
        self._requests: requestlog.RequestLogConsumer | None = None
        self._retention: requestlog.Retention | None = None
        self._budgets: BudgetGauges | None = None
        self._advisories: asyncio.Task[None] | None = None
        self.logger = log.get("metering")

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "metering not started"
        return self._pool

    async def start(self) -> None:
        cfg = self.cfg
        await self.service.connect()
        # No idle floor: asyncpg would log a traceback per attempt to restore it while PostgreSQL is down.
        self._pool = await db.connect(cfg.database_url, min_size=0, max_size=cfg.db_pool_size)
        applied = await db.migrate(self._pool, "services.metering", "metering")
        if applied:
            self.logger.info("migrations_applied", files=applied)
        js = self.service.bus.jetstream()
        await ensure_stream(js)
        await deadletters.ensure_stream(js)
        await ensure_requests_stream(js)
        await ensure_consumer(js, cfg.durable, cfg.ack_wait_s, cfg.max_ack_pending, cfg.max_deliver)
        await requestlog.ensure_consumer(
            js, cfg.requestlog_durable, cfg.requestlog_ack_wait_s, cfg.requestlog_max_deliver
        )
        dead = deadletters.DeadLetters(js, cfg.durable)
        self._advisories = asyncio.create_task(dead.follow_advisories(f"{cfg.durable}-maxdeliver"))
        self._consumer = Consumer(
            self._pool,
            dead,
            durable=cfg.durable,
            batch_size=cfg.batch_size,
            batch_timeout_s=cfg.batch_timeout_s,
            ack_wait_s=cfg.ack_wait_s,
            max_ack_pending=cfg.max_ack_pending,
            max_deliver=cfg.max_deliver,
            write_timeout_s=cfg.write_timeout_s,
            max_backoff_s=cfg.max_backoff_s,
            writers=cfg.writers,
        )
        self.broker = NatsBroker(
            bus.servers(cfg.nats_url),
            name=f"inferbus-metering-consumer-{self.service.instance_id}",
            **broker_identity(bus.Identity.of(cfg)),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            apply_types=False,  # the handler takes the raw batch: no per-message casting
            logger=logging.getLogger("inferbus.faststream"),
            log_level=logging.DEBUG,  # one line per batch would drown the service's own logs
            graceful_timeout=cfg.drain_s,
        )
        self._subscriber = self._consumer.subscribe(self.broker)
        self._consumer.start()
        await self.broker.start()
        self._requests = requestlog.RequestLogConsumer(
            self._pool,
            js,
            durable=cfg.requestlog_durable,
            batch_size=cfg.requestlog_batch_size,
            fetch_wait_s=cfg.requestlog_fetch_wait_s,
            write_timeout_s=cfg.write_timeout_s,
            max_backoff_s=cfg.max_backoff_s,
        )
        await self._requests.start()
        self._retention = requestlog.Retention(
            self._pool,
            row_retention_days=cfg.requestlog_retention_days,
            interval_s=cfg.requestlog_retention_interval_s,
        )
        self._retention.start()
        self._budgets = BudgetGauges(self._pool, cfg.budget_interval_s)
        self._budgets.start()
        self.service.stats_source = self.stats
        endpoints: list[tuple[str, str, service.MicroHandler, str | None]] = [
            ("prices_set", usage.PRICES_SET, admin.handler(self.logger, SetPrice, self.set_price), QUEUE),
            ("prices_list", usage.PRICES_LIST, admin.handler(self.logger, ListPrices, self.list_prices), QUEUE),
            ("usage_query", usage.USAGE_QUERY, admin.handler(self.logger, UsageQuery, self.usage_query), QUEUE),
            ("dead_letters", usage.DEAD_LETTERS, admin.handler(self.logger, ListDeadLetters, self.dead_letters), QUEUE),
            ("requests_query", reqlog.REQUESTS_QUERY, admin.handler(self.logger, RequestQuery, self.requests), QUEUE),
            (
                "requests_retention",
                reqlog.REQUESTS_RETENTION,
                admin.handler(self.logger, RunRetention, self.run_retention),
                QUEUE,
            ),
        ]
        await self.service.register(endpoints)

    async def close(self) -> None:
        if self._advisories is not None:
            self._advisories.cancel()
            await asyncio.gather(self._advisories, return_exceptions=True)
        if self._subscriber is not None:
            await self._subscriber.stop()  # no more fetches
        if self._consumer is not None:
            await self._consumer.stop(self.cfg.drain_s)  # commit and ack what was fetched
        if self._requests is not None:
            await self._requests.stop(self.cfg.drain_s)
        if self._retention is not None:
            await self._retention.stop()
        if self._budgets is not None:
            await self._budgets.stop()
        if self.broker is not None:
            await self.broker.stop()
        await self.service.close()
        if self._pool is not None:
            await self._pool.close()

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            **(self._consumer.stats() if self._consumer is not None else {}),
            **(self._requests.stats() if self._requests is not None else {}),
        }

    async def set_price(self, req: SetPrice) -> PriceView:
        view = await prices.set_price(self.pool, req)
        self.logger.info("price_set", **msgspec.to_builtins(view))
        await self.service.bus.publish(usage.PRICES_CHANGED, msgspec.json.encode(view))
        return view

    async def list_prices(self, req: ListPrices) -> list[PriceView]:
        return await prices.list_prices(self.pool, req)

    async def usage_query(self, req: UsageQuery) -> UsageReport:
        return await query.run(self.pool, req)

    async def dead_letters(self, req: ListDeadLetters) -> DeadLetterReport:
        return await deadletters.recent(self.service.bus.jetstream(), req.limit)

    async def requests(self, req: RequestQuery) -> RequestPage:
        return await requestlog.query(self.pool, req)

    async def run_retention(self, req: RunRetention) -> RetentionReport:
        assert self._retention is not None
        return await self._retention.run()


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(MeteringSettings, "metering")
    log.configure("metering", cfg.log_level)
    metering = Metering(cfg)
    await metering.start()
    metering.logger.info("metering_ready", durable=cfg.durable, batch_size=cfg.batch_size)
    await stop.wait()
    metering.logger.info("draining")
    await metering.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()

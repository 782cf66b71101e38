"""Provider host: one process serves every remote provider version the registry holds.

A remote version (engine openai, anthropic or gemini) is registered like any other; this process asks the
registry for all of them with their secrets (`registry.provider.versions`: only the `provider` role may),
and runs an LLM worker per version on the usual subjects, so routing, canaries, shadows, cancel, usage and
heartbeats work unchanged. It refetches when the registry says something changed (and every `refresh_s`):
a new version starts serving, a removed one drains, new secrets reach the engine in place (no restart),
and changed params replace the engine behind a fresh worker while the old one drains. Each version's
upstream is health-checked every `health_s` (a models-list call), reported with its load.

    python -m services.llm.providers        # `inferbus up` starts one
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import msgspec

from contracts import subjects
from contracts.registry import REMOTE_ENGINES, ProviderVersion, ProviderVersions
from services.llm import engines
from services.llm.worker import LLMWorker, WorkerSettings
from services.runtime import bus, service, settings, usage
from services.runtime import logging as log


class ProviderHostSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    engines: list[str] = []  # remote engines this host serves; empty: all of them
    refresh_s: float = 10.0  # refetch the versions this often even without a change notice
    health_s: float = 15.0  # health-check each upstream this often
    max_queue: int = 1024
    heartbeat_s: float = 0.5
    coalesce_ms: float = 0.0
    coalesce_tokens: int = 64
    drain_grace_s: float = 10.0


class _Reply(msgspec.Struct):
    result: list[ProviderVersion] | None = None
    error: dict[str, Any] | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


class Hosted:
    """One remote version being served: its engine, its worker, and what it was built from."""

    def __init__(self, spec: ProviderVersion, engine: engines.Engine, worker: LLMWorker) -> None:
        self.spec = spec
        self.engine = engine
        self.worker = worker


class ProviderHost:
    def __init__(self, cfg: ProviderHostSettings) -> None:
        self.cfg = cfg
        self.service = service.Service("inferbus-providers", cfg, description="Remote provider versions")
        self.hosted: dict[tuple[str, str], Hosted] = {}
        self.publisher: usage.UsagePublisher | None = None
        self.logger = log.get("providers")
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining: set[asyncio.Task[None]] = set()
        self.refreshes = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        await self.service.connect()
        nc = self.service.bus
        js = nc.jetstream()
        await usage.ensure_stream(js)
        self.publisher = usage.UsagePublisher(js)
        self.publisher.start()
        self.service.stats_source = self.stats
        self.service.metadata.update({"kind": "llm", "engines": ",".join(self.cfg.engines or sorted(REMOTE_ENGINES))})
        await self.service.register([])
        await nc.subscribe(subjects.PROVIDER_CHANGED, cb=self._on_changed)
        await self.refresh()
        self._tasks = [asyncio.create_task(self._refresh_loop()), asyncio.create_task(self._health_loop())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._retire(h) for h in list(self.hosted.values())), *self._draining,
                             return_exceptions=True)
        self.hosted.clear()
        if self.publisher is not None:
            await self.publisher.drain(self.cfg.drain_grace_s)
        await self.service.close()

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "refreshes": self.refreshes,
            "last_error": self.last_error,
            "workers": [h.worker.stats() | {"upstream": h.worker.upstream} for h in self.hosted.values()],
        }

    # ---- the versions ------------------------------------------------------------------------

    async def fetch(self) -> list[ProviderVersion]:
        request = msgspec.json.encode(ProviderVersions(engines=self.cfg.engines))
        msg = await self.service.bus.request(subjects.PROVIDER_VERSIONS, request, timeout=5.0)
        reply = _reply_decoder.decode(msg.data)
        if reply.error is not None or reply.result is None:
            raise RuntimeError(f"the registry refused: {(reply.error or {}).get('message', 'no result')}")
        return reply.result

    async def refresh(self) -> None:
        try:
            specs = await self.fetch()
        except Exception as exc:  # registry down: keep serving what we have
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.logger.warning("provider_versions_unavailable", error=self.last_error)
            return
        self.refreshes += 1
        self.last_error = None
        wanted = {(s.model, s.version): s for s in specs}
        for key in [k for k in self.hosted if k not in wanted]:
            self._drain(self.hosted.pop(key))
        for key, spec in wanted.items():
            current = self.hosted.get(key)
            if current is not None and current.spec.revision == spec.revision:
                continue
            if current is not None and current.spec.engine == spec.engine and current.spec.params == spec.params:
                update = getattr(current.engine, "update_secrets", None)
                if update is not None:
                    update(spec.secrets)  # rotation: the next request uses the new key, nothing restarts
                    current.spec = spec
                    self.logger.info("provider_secrets_rotated", model=spec.model, version=spec.version)
                    continue
            try:
                hosted = await self._host(spec)
            except Exception as exc:
                self.logger.error("provider_version_failed", model=spec.model, version=spec.version,
                                  engine=spec.engine, error=f"{type(exc).__name__}: {exc}")
                continue
            self.hosted[key] = hosted
            if current is not None:
                self._drain(current)

    async def _host(self, spec: ProviderVersion) -> Hosted:
        options = {**spec.params, **spec.secrets}
        options.setdefault("model", spec.model)
        engine = engines.create(spec.engine, options)

        def progress(step: str, fraction: float) -> None:
            self.logger.info("provider_loading", model=spec.model, version=spec.version, step=step,
                             progress=f"{fraction:.0%}")

        await engine.load(progress)
        digest = hashlib.blake2b(f"{spec.model}\0{spec.version}\0{spec.revision}".encode(), digest_size=4).hexdigest()
        worker_settings = WorkerSettings(
            model=spec.model, version=spec.version, worker_id=f"{self.service.instance_id}-{digest}",
            max_queue=self.cfg.max_queue, heartbeat_s=self.cfg.heartbeat_s, coalesce_ms=self.cfg.coalesce_ms,
            coalesce_tokens=self.cfg.coalesce_tokens,
        )
        worker = LLMWorker(self.service.bus, engine, worker_settings, self.publisher)
        hosted = Hosted(spec, engine, worker)
        await self._check(hosted)
        await worker.start()
        self.logger.info("provider_ready", model=spec.model, version=spec.version, engine=spec.engine,
                         subject=worker.subject, upstream=worker.upstream)
        return hosted

    def _drain(self, hosted: Hosted) -> None:
        task = asyncio.create_task(self._retire(hosted))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _retire(self, hosted: Hosted) -> None:
        await hosted.worker.stop(self.cfg.drain_grace_s)
        await hosted.engine.close()
        self.logger.info("provider_stopped", model=hosted.spec.model, version=hosted.spec.version)

    # ---- loops -------------------------------------------------------------------------------

    async def _on_changed(self, msg: bus.Msg) -> None:
        self._changed.set()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.cfg.refresh_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            await self.refresh()

    async def _check(self, hosted: Hosted) -> None:
        check = getattr(hosted.engine, "health", None)
        if check is None:
            return
        ok, reason = await check()
        was = hosted.worker.upstream
        hosted.worker.upstream = "ok" if ok else reason
        if hosted.worker.upstream != was and was is not None:
            self.logger.warning("upstream_health", model=hosted.spec.model, version=hosted.spec.version,
                                status=hosted.worker.upstream)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_s)
            await asyncio.gather(*(self._check(h) for h in list(self.hosted.values())), return_exceptions=True)


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(ProviderHostSettings, "providers")
    log.configure("providers", cfg.log_level)
    host = ProviderHost(cfg)
    await host.start()
    host.logger.info("providers_ready", versions=len(host.hosted))
    await stop.wait()
    host.logger.info("draining")
    await host.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()

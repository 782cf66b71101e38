"""PostgreSQL: a pool, and versioned migrations applied at start-up under an advisory lock."""

from __future__ import annotations

import importlib.resources

import asyncpg

_LOCK_ID = 0x1B_F00D


async def connect(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool, package: str, service: str) -> list[str]:
    """Apply `package`'s migrations/NNNN_name.sql files not yet applied; return the ones applied now."""
    files = sorted(
        (f for f in importlib.resources.files(package).joinpath("migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " service text NOT NULL, version text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (service, version))"
        )
        rows = await conn.fetch("SELECT version FROM schema_migrations WHERE service=$1", service)
        done = {r["version"] for r in rows}
        for f in files:
            if f.name in done:
                continue
            await conn.execute(f.read_text())
            await conn.execute("INSERT INTO schema_migrations (service, version) VALUES ($1, $2)", service, f.name)
            applied.append(f.name)
    return applied

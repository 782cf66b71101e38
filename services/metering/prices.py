"""The price table: USD per million tokens, per audio second and per image, per model version or for any version;
and the fraction batch lines get off that price."""

from __future__ import annotations

import math
from decimal import Decimal

import asyncpg

from contracts import subjects
from contracts.errors import invalid
from contracts.usage import ANY_VERSION, CURRENCY, ListPrices, PriceView, SetPrice

MAX_PRICE = 1_000_000.0  # per unit: anything above is a typo, not a price


def check_name(value: str, param: str) -> str:
    if not value or len(value) > 128 or subjects.token(value) != value:
        raise invalid(f"{param} must be 1-128 characters with no '.', '*', '>' or whitespace", param)
    return value


def check_price(value: float, param: str) -> Decimal:
    if not math.isfinite(value) or not 0 <= value <= MAX_PRICE:
        raise invalid(f"{param} must be a number between 0 and {MAX_PRICE:g} (USD), got {value}", param)
    return Decimal(repr(value))


def check_fraction(value: float, param: str) -> Decimal:
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise invalid(f"{param} must be a fraction between 0 and 1 (0.5 is half price), got {value}", param)
    return Decimal(repr(value))


def _view(row: asyncpg.Record) -> PriceView:
    return PriceView(
        model=row["model"],
        version=row["version"],
        input_per_1m=float(row["input_per_1m"]),
        output_per_1m=float(row["output_per_1m"]),
        per_audio_second=float(row["per_audio_second"]),
        per_image=float(row["per_image"]),
        currency=row["currency"],
        updated_at=row["updated_at"].isoformat(),
        updated_by=row["updated_by"],
        batch_discount=float(row["batch_discount"]),
    )


async def set_price(pool: asyncpg.Pool, req: SetPrice) -> PriceView:
    """Validate everything before writing anything; events priced from now on use the new row."""
    model = check_name(req.model, "model")
    version = req.version if req.version == ANY_VERSION else check_name(req.version, "version")
    values = (
        check_price(req.input_per_1m, "input_per_1m"),
        check_price(req.output_per_1m, "output_per_1m"),
        check_price(req.per_audio_second, "per_audio_second"),
        check_price(req.per_image, "per_image"),
        check_fraction(req.batch_discount, "batch_discount"),
    )
    if req.currency != CURRENCY:
        raise invalid(f"prices are in {CURRENCY} only", "currency")
    row = await pool.fetchrow(
        "INSERT INTO prices AS p (model, version, input_per_1m, output_per_1m, per_audio_second, per_image,"
        " batch_discount, currency, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9)"
        " ON CONFLICT (model, version) DO UPDATE SET input_per_1m = EXCLUDED.input_per_1m,"
        " output_per_1m = EXCLUDED.output_per_1m, per_audio_second = EXCLUDED.per_audio_second,"
        " per_image = EXCLUDED.per_image, batch_discount = EXCLUDED.batch_discount,"
        " updated_at = now(), updated_by = EXCLUDED.updated_by"
        " RETURNING *",
        model,
        version,
        *values,
        CURRENCY,
        req.actor,
    )
    assert row is not None
    return _view(row)


async def list_prices(pool: asyncpg.Pool, req: ListPrices) -> list[PriceView]:
    rows = await pool.fetch(
        "SELECT * FROM prices WHERE $1::text IS NULL OR model = $1 ORDER BY model, version = '*', version", req.model
    )
    return [_view(r) for r in rows]

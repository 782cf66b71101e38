"""`inferbus` entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from services.cli import batches, models, requests, state, tenancy, usage
from services.cli import config as config_cli
from services.runtime import bus


async def _status() -> int:
    url = state.nats_url()
    try:
        nc = await bus.connect(url, "inferbus-cli", connect_timeout=2, identity=state.nats_identity(), reconnect=False)
    except Exception as exc:
        print(f"cannot reach NATS at {url}: {exc}. Is `inferbus up` running?", file=sys.stderr)
        return 2
    try:
        found = await bus.discover(nc, "STATS", wait=0.5)
        if not found:
            print("no InferBus services answered", file=sys.stderr)
            return 1
        rows = [("SERVICE", "ID", "VERSION", "HEALTH", "DETAILS")]
        for svc in sorted(found, key=lambda s: (s.get("name", ""), s.get("id", ""))):
            health = await _health(nc, svc)
            data = bus.stats_data(svc)
            details = " ".join(f"{k}={v}" for k, v in data.items() if k in (
                "model", "version", "engine", "in_flight", "queued", "served", "models"))
            rows.append((svc.get("name", "?"), svc.get("id", "?")[:12], svc.get("version", "?"), health, details))
            for worker in data.get("workers", []):  # a provider host: one line per remote version it serves
                shown = " ".join(f"{k}={worker.get(k)}" for k in ("model", "version", "engine", "in_flight", "served"))
                rows.append(("", "", "", f"upstream {worker.get('upstream') or '?'}", shown))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return 0
    finally:
        await nc.close()


async def _health(nc: bus.Connection, svc: dict[str, Any]) -> str:
    try:
        reply = await nc.request(f"admin.health.{svc['name']}.{svc['id']}", b"", timeout=1)
        return str(json.loads(reply.data).get("status", "?"))
    except Exception:
        return "unreachable"


def _nats(args: Any) -> int:
    from pathlib import Path

    from services.runtime import natsauth

    if args.nats_command == "permissions":
        print(natsauth.permission_table())
        return 0
    secrets = natsauth.Secrets(state.data_dir() / "secrets").ensure()
    store = Path(args.store_dir) if args.store_dir else None
    print(natsauth.server_config(secrets, host=args.host, port=args.port, store_dir=store), end="")
    print(f"# credentials: {secrets.root} (give each service its nats-<role>.json as INFERBUS_NATS_CREDENTIALS)",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferbus", description="InferBus inference platform")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the whole platform on this machine")
    p_up.add_argument("--port", type=int, default=None, help="gateway port (default 8080, or INFERBUS_GATEWAY_PORT)")
    p_up.add_argument("--rotate-admin-key", action="store_true",
                      help="mint a new admin key (kept in the data dir) and revoke the previous one")
    p_up.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    p_up.add_argument("--config", default=None, help="deployment file (inferbus.toml): what runs, where; see infra/")
    p_run = sub.add_parser("run", help="start one service or worker of a deployment file, on its own")
    p_run.add_argument("name", help="a service (gateway, registry, ...) or a [[workers]] name")
    p_run.add_argument("--config", required=True, help="deployment file")
    config_cli.add_parser(sub)
    sub.add_parser("status", help="list running services and their health")
    p_nats = sub.add_parser("nats", help="the bus's identities: server config for an external nats-server")
    nats_sub = p_nats.add_subparsers(dest="nats_command", required=True)
    p_conf = nats_sub.add_parser("config", help="print the server config (accounts, role users, auth callout)")
    p_conf.add_argument("--port", type=int, default=4222)
    p_conf.add_argument("--host", default="127.0.0.1")
    p_conf.add_argument("--store-dir", default=None, help="JetStream store directory")
    nats_sub.add_parser("permissions", help="print the role permission table (Markdown)")
    tenancy.add_parsers(sub)
    models.add_parser(sub)
    usage.add_parser(sub)
    requests.add_parser(sub)
    batches.add_parser(sub)
    p_contracts = sub.add_parser("contracts", help="machine-readable descriptions of the bus, from contracts/")
    p_contracts.add_argument("--asyncapi", action="store_true", help="an AsyncAPI 3 document (JSON) of the bus")
    args = parser.parse_args(argv)

    if args.command == "contracts":
        if not args.asyncapi:
            parser.error("contracts: say which document, e.g. --asyncapi")
        from contracts import asyncapi

        print(json.dumps(asyncapi.document(), indent=2))
        return 0

    if args.command == "config":
        return config_cli.run(args)
    if args.command == "run":
        from services.cli import up

        return up.run_one(args.name, args.config)
    if args.command == "up":
        from services.cli import up

        return up.run(args)
    if args.command == "status":
        return asyncio.run(_status())
    if args.command == "nats":
        return _nats(args)
    if args.command in ("keys", "tenants"):
        return tenancy.run(args, parser)
    if args.command in ("usage", "prices"):
        return usage.run(args, parser)
    if args.command == "models":
        return models.run(args, parser)
    if args.command == "requests":
        return requests.run(args, parser)
    if args.command in ("batch", "batches"):
        return batches.run(args, parser)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())

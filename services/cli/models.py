"""`inferbus models ...`: the registry's admin requests from the command line."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from contracts import subjects
from contracts.registry import (
    Analysis,
    Breaker,
    Comparisons,
    Deploy,
    History,
    ListModels,
    Promote,
    RegisterVersion,
    Rollback,
    SetAB,
    SetCanary,
    SetRouting,
    SetSecrets,
    SetShadow,
    ShowModel,
)
from services.cli import admin
from services.cli.admin import table


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="model registry: versions, canary, A/B, shadow, rollback")
    p.add_argument("--json", action="store_true", help="print the registry's reply as JSON")
    ms = p.add_subparsers(dest="models_command", required=True)
    ms.add_parser("list", help="models with their versions, traffic policy and live workers")
    s = ms.add_parser("show", help="one model: versions, policy, workers, live metrics per version")
    s.add_argument("model")
    s = ms.add_parser("register", help="register a model and/or a version of it")
    s.add_argument("model")
    s.add_argument("version", nargs="?")
    s.add_argument("--kind", default="llm", help="llm (default), embed, asr, tts, vision")
    s.add_argument("--engine", help="engine of the version, e.g. llamacpp, transformers, vllm")
    s.add_argument("--description", default="")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="engine parameter (repeatable)")
    s.add_argument("--secret", action="append", default=[], metavar="NAME[=VALUE]", help=SECRET_HELP)
    s = ms.add_parser("secrets", help="set, rotate or delete a remote version's secrets (no restart needed)")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("secrets", nargs="*", metavar="NAME[=VALUE]", help=SECRET_HELP)
    s.add_argument("--delete", action="append", default=[], metavar="NAME", help="delete this secret (repeatable)")
    s = ms.add_parser("routing", help="routing strategy, version pool, fallback chain and circuit breaker")
    s.add_argument("model")
    s.add_argument("--strategy", choices=["weighted", "least_busy", "latency", "cost"])
    s.add_argument("--pool", metavar="VERSION=WEIGHT,...", help="versions that serve interchangeably ('' clears)")
    s.add_argument("--fallbacks", metavar="MODEL,...", help="models tried in order when this one fails ('' clears)")
    s.add_argument("--fallback-on", metavar="CODE,...", help="error codes that trigger a fallback")
    s.add_argument("--max-attempts", type=int, help="sends per request across routes (default 3)")
    s.add_argument("--budget", type=float, help="seconds a request may spend on fallbacks (default 30)")
    s.add_argument("--breaker-failures", type=int, help="failures in the window that open a breaker (default 3)")
    s.add_argument("--breaker-window", type=float, help="breaker failure window in seconds (default 10)")
    s.add_argument("--breaker-cooldown", type=float, help="seconds a breaker stays open before a probe (default 5)")
    s = ms.add_parser("deploy", help="make VERSION the stable version now (ends canary and A/B)")
    s.add_argument("model")
    s.add_argument("version")
    s = ms.add_parser("canary", help="send --weight percent of traffic to VERSION")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--weight", type=float, required=True, help="percent of traffic, 0-100")
    s.add_argument("--steps", help="automatic promotion steps in percent, e.g. 5,25,50,100")
    s.add_argument("--interval", type=float, help="seconds between analyses / promotion steps (default 10)")
    s.add_argument("--window", type=float, help="sliding analysis window in seconds (default 60)")
    s.add_argument("--min-samples", type=int, help="canary requests needed before a verdict (default 20)")
    s.add_argument("--max-error-increase", type=float, help="allowed error-rate excess over stable (default 0.05)")
    s.add_argument("--max-latency-ratio", type=float, help="allowed p95 latency ratio to stable (default 1.5)")
    s = ms.add_parser("promote", help="make the canary stable, or set its weight with --weight")
    s.add_argument("model")
    s.add_argument("--weight", type=float)
    s = ms.add_parser("rollback", help="take the canary out of traffic")
    s.add_argument("model")
    s.add_argument("--reason", default="manual rollback")
    s = ms.add_parser("ab", help="A/B split: VERSION=WEIGHT ... (weights sum to 100); --off ends it")
    s.add_argument("model")
    s.add_argument("groups", nargs="*", metavar="VERSION=WEIGHT")
    s.add_argument("--sticky", choices=["key", "user"], default="key", help="assignment sticks per API key or user")
    s.add_argument("--off", action="store_true")
    s = ms.add_parser("shadow", help="copy --rate percent of requests to VERSION (never returned, never billed)")
    s.add_argument("model")
    s.add_argument("version", nargs="?")
    s.add_argument("--rate", type=float, default=100.0, help="percent of requests copied (default 100)")
    s.add_argument("--off", action="store_true")
    s = ms.add_parser("history", help="audit history of a model's changes")
    s.add_argument("model")
    s.add_argument("--limit", type=int, default=20)
    s = ms.add_parser("comparisons", help="shadow comparison records and their summary")
    s.add_argument("model")
    s.add_argument("--limit", type=int, default=10)


def build(args: argparse.Namespace) -> tuple[str, msgspec.Struct]:
    """The admin operation and its typed request for parsed arguments (argument errors raise ValueError)."""
    actor = f"cli:{getpass.getuser()}"
    cmd = args.models_command
    if cmd == "list":
        return "list", ListModels(actor=actor)
    if cmd == "show":
        return "show", ShowModel(model=args.model, actor=actor)
    if cmd == "register":
        params: dict[str, Any] = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        if args.version and not args.engine:
            raise ValueError("registering a version needs --engine")
        secrets = {name: value for name, value in map(secret_value, args.secret) if value is not None}
        return "register", RegisterVersion(
            model=args.model,
            kind=args.kind,
            description=args.description,
            version=args.version,
            engine=args.engine,
            params=params,
            secrets=secrets,
            actor=actor,
        )
    if cmd == "secrets":
        changes: dict[str, str | None] = dict(map(secret_value, args.secrets))
        changes.update({name: None for name in args.delete})
        if not changes:
            raise ValueError("give NAME=VALUE pairs to set, or --delete NAME")
        return "secrets", SetSecrets(model=args.model, version=args.version, secrets=changes, actor=actor)
    if cmd == "routing":
        return "routing", routing_request(args, actor)
    if cmd == "deploy":
        return "deploy", Deploy(model=args.model, version=args.version, actor=actor)
    if cmd == "canary":
        steps = [float(x) for x in args.steps.split(",")] if args.steps else []
        overrides = {
            k: v
            for k, v in {
                "interval_s": args.interval,
                "window_s": args.window,
                "min_samples": args.min_samples,
                "max_error_rate_increase": args.max_error_increase,
                "max_latency_ratio": args.max_latency_ratio,
            }.items()
            if v is not None
        }
        analysis = msgspec.structs.replace(Analysis(), **overrides) if overrides else None
        return "canary", SetCanary(
            model=args.model, version=args.version, weight=args.weight, steps=steps, analysis=analysis, actor=actor
        )
    if cmd == "promote":
        return "promote", Promote(model=args.model, weight=args.weight, actor=actor)
    if cmd == "rollback":
        return "rollback", Rollback(model=args.model, reason=args.reason, actor=actor)
    if cmd == "ab":
        groups: dict[str, float] = {}
        if not args.off:
            if not args.groups:
                raise ValueError("give VERSION=WEIGHT pairs, or --off")
            for item in args.groups:
                version, sep, weight = item.partition("=")
                if not sep:
                    raise ValueError(f"expected VERSION=WEIGHT, got {item!r}")
                groups[version] = float(weight)
        return "ab", SetAB(model=args.model, groups=groups, sticky=args.sticky, actor=actor)
    if cmd == "shadow":
        if not args.off and not args.version:
            raise ValueError("give the shadow VERSION, or --off")
        return "shadow", SetShadow(
            model=args.model,
            version=None if args.off else args.version,
            rate=0.0 if args.off else args.rate,
            actor=actor,
        )
    if cmd == "history":
        return "history", History(model=args.model, limit=args.limit, actor=actor)
    if cmd == "comparisons":
        return "comparisons", Comparisons(model=args.model, limit=args.limit, actor=actor)
    raise ValueError(f"unknown models command {cmd!r}")


SECRET_HELP = ("provider secret, e.g. api_key=env:OPENAI_API_KEY (from the environment), api_key=@file, or just"
               " api_key to be asked for it; a literal api_key=sk-... works but stays in your shell history")


def secret_value(item: str) -> tuple[str, str]:
    """NAME=VALUE, NAME=env:VAR, NAME=@path, or NAME alone (asked for, or read from stdin when piped)."""
    name, sep, value = item.partition("=")
    if not name:
        raise ValueError(f"--secret expects NAME[=VALUE], got {item!r}")
    if not sep:
        value = getpass.getpass(f"{name}: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    elif value.startswith("env:"):
        if value[4:] not in os.environ:
            raise ValueError(f"secret {name}: the environment variable {value[4:]} is not set")
        value = os.environ[value[4:]]
    elif value.startswith("@"):
        value = Path(value[1:]).expanduser().read_text().strip()
    if not value:
        raise ValueError(f"secret {name} is empty")
    return name, value


def routing_request(args: argparse.Namespace, actor: str) -> SetRouting:
    def names(raw: str | None) -> list[str] | None:
        return None if raw is None else [x.strip() for x in raw.split(",") if x.strip()]

    pool: dict[str, float] | None = None
    if args.pool is not None:
        pool = {}
        for item in names(args.pool) or []:
            version, sep, weight = item.partition("=")
            pool[version] = float(weight) if sep else 100.0
    breaker = None
    if any(x is not None for x in (args.breaker_failures, args.breaker_window, args.breaker_cooldown)):
        overrides = {k: v for k, v in {"failures": args.breaker_failures, "window_s": args.breaker_window,
                                        "cooldown_s": args.breaker_cooldown}.items() if v is not None}
        breaker = msgspec.structs.replace(Breaker(), **overrides)
    request = SetRouting(model=args.model, strategy=args.strategy, pool=pool, fallbacks=names(args.fallbacks),
                         fallback_on=names(args.fallback_on), max_attempts=args.max_attempts, budget_s=args.budget,
                         breaker=breaker, actor=actor)
    if request == SetRouting(model=args.model, actor=actor):
        raise ValueError("nothing to change: give --strategy, --pool, --fallbacks, ...")
    return request


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        op, body = build(args)
    except ValueError as exc:
        parser.error(str(exc))
    return admin.run(subjects.registry_admin(op), body, lambda result: render(op, result), args.json, "registry")


# ---- rendering -------------------------------------------------------------------------------


def _policy(p: dict[str, Any]) -> str:
    parts = [f"stable={p.get('stable') or '-'}"]
    if p.get("canary"):
        rollout = p.get("rollout")
        steps = f" steps={','.join(f'{s:g}' for s in rollout['steps'])}" if rollout else ""
        parts.append(f"canary={p['canary']}@{p.get('canary_weight', 0):g}%{steps}")
    if p.get("ab"):
        parts.append("ab=" + ",".join(f"{v}:{w:g}%" for v, w in p["ab"].items()) + f" sticky={p.get('sticky', 'key')}")
    if p.get("shadow"):
        parts.append(f"shadow={p['shadow']}@{p.get('shadow_rate', 0):g}%")
    r = p.get("routing") or {}
    if r.get("pool"):
        pool = ",".join(f"{v}:{w:g}" for v, w in r["pool"].items())
        parts.append(f"pool={pool} strategy={r.get('strategy', 'weighted')}")
    if r.get("fallbacks"):
        parts.append("fallbacks=" + ">".join(r["fallbacks"]))
    return " ".join(parts)


def _model_line(m: dict[str, Any]) -> list[str]:
    healthy = sum(1 for w in m["workers"] if w["healthy"])
    return [
        m["name"],
        m["kind"],
        _policy(m["policy"]),
        ",".join(v["version"] for v in m["versions"]),
        f"{healthy}/{len(m['workers'])}",
        str(m["revision"]),
    ]


def _breaker(state: dict[str, Any] | None) -> str:
    if not state:
        return "closed"
    return f"{state['state']} ({state.get('reason', '')})"


def render(op: str, result: Any) -> str:
    if op == "list":
        if not result:
            return "no models registered"
        return table([["MODEL", "KIND", "POLICY", "VERSIONS", "WORKERS", "REV"], *map(_model_line, result)])
    if op == "secrets":
        return f"{result['model']}/{result['version']} secrets: {', '.join(result['secrets']) or 'none'}"
    if op == "history":
        rows = [["ID", "AT", "ACTOR", "ACTION", "REASON / CHANGE"]]
        for e in result:
            change = e["reason"] or (
                _policy(e["after"]) if e["after"] and "kind" not in e["after"] else json.dumps(e["after"])
            )
            rows.append([str(e["id"]), e["at"][:19], e["actor"], e["action"], change])
        return table(rows)
    if op == "comparisons":
        lines = [
            f"{result['model']}: {result['count']} comparisons, shadow error rate {result['shadow_error_rate']:.1%}, "
            f"mean similarity {result['mean_similarity']}, mean latency ratio {result['mean_latency_ratio']}"
        ]
        rows = [["REQUEST", "VERSION", "SHADOW", "MS", "SHADOW MS", "CHARS", "SHADOW CHARS", "SIMILARITY", "ERRORS"]]
        for r in result["records"]:
            rows.append(
                [
                    r["request_id"],
                    r["version"],
                    r["shadow_version"],
                    f"{r['latency_ms']:.1f}",
                    f"{r['shadow_latency_ms']:.1f}",
                    str(r["output_chars"]),
                    str(r["shadow_output_chars"]),
                    "-" if r["similarity"] is None else f"{r['similarity']:.3f}",
                    f"{r['error'] or '-'}/{r['shadow_error'] or '-'}",
                ]
            )
        return "\n".join(lines + ([table(rows)] if result["records"] else []))
    # show and every change print the model as it now is
    m = result
    out = [f"{m['name']} ({m['kind']}) revision {m['revision']}: {_policy(m['policy'])}"]
    if m.get("description"):
        out.append(m["description"])
    out.append(
        table(
            [
                ["VERSION", "ENGINE", "STATUS", "CREATED", "SECRETS", "BREAKER"],
                *[[v["version"], v["engine"], v["status"], v["created_at"][:19], ",".join(v.get("secrets", [])) or "-",
                   _breaker(m.get("breakers", {}).get(v["version"]))] for v in m["versions"]],
            ]
        )
    )
    if m["workers"]:
        out.append(
            table(
                [
                    ["WORKER", "VERSION", "IN FLIGHT", "QUEUED", "TOK/S", "HEALTHY", "UPSTREAM", "SEEN"],
                    *[
                        [
                            w["worker_id"],
                            w["version"],
                            str(w["in_flight"]),
                            str(w["queued"]),
                            f"{w['tokens_per_s']:g}",
                            "yes" if w["healthy"] else "no",
                            w.get("upstream") or "-",
                            f"{w['last_seen_s']}s ago",
                        ]
                        for w in m["workers"]
                    ],
                ]
            )
        )
    else:
        out.append("no live workers")
    if m["metrics"]:
        out.append(
            table(
                [
                    ["VERSION", "REQUESTS", "ERROR RATE", "P95 MS", "TTFT P95 MS"],
                    *[
                        [
                            x["version"],
                            str(x["requests"]),
                            f"{x['error_rate']:.1%}",
                            str(x["p95_ms"]),
                            str(x["ttft_p95_ms"]),
                        ]
                        for x in m["metrics"]
                    ],
                ]
            )
        )
    return "\n\n".join(out)

"""`inferbus models ...`: the registry's admin requests from the command line."""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

import msgspec

from contracts import subjects
from contracts.registry import (
    Analysis,
    Comparisons,
    Deploy,
    History,
    ListModels,
    Promote,
    RegisterVersion,
    Rollback,
    SetAB,
    SetCanary,
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
        return "register", RegisterVersion(
            model=args.model,
            kind=args.kind,
            description=args.description,
            version=args.version,
            engine=args.engine,
            params=params,
            actor=actor,
        )
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


def render(op: str, result: Any) -> str:
    if op == "list":
        if not result:
            return "no models registered"
        return table([["MODEL", "KIND", "POLICY", "VERSIONS", "WORKERS", "REV"], *map(_model_line, result)])
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
                ["VERSION", "ENGINE", "STATUS", "CREATED"],
                *[[v["version"], v["engine"], v["status"], v["created_at"][:19]] for v in m["versions"]],
            ]
        )
    )
    if m["workers"]:
        out.append(
            table(
                [
                    ["WORKER", "VERSION", "IN FLIGHT", "QUEUED", "TOK/S", "HEALTHY", "SEEN"],
                    *[
                        [
                            w["worker_id"],
                            w["version"],
                            str(w["in_flight"]),
                            str(w["queued"]),
                            f"{w['tokens_per_s']:g}",
                            "yes" if w["healthy"] else "no",
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

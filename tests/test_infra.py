"""infra/ validated with the tools that exist here: hadolint, docker-compose, kubernetes-validate, systemd-analyze,
nats-server -t, promtool and amtool; and every metric a rule or a dashboard names is one the services export.

The Debian tools come from `make infra-tools` (part of `make test`); a missing one fails its test, it never skips.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import config
from services.runtime import deployment
from services.runtime.embedded import _nats_binary
from services.runtime.natsauth import Secrets, server_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
VENV_BIN = Path(sys.executable).parent
CLUSTER = config.checked(INFRA / "examples/cluster.toml")


def tool(name: str) -> str:
    found = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    assert found, f"{name} is missing: `make infra-tools` installs it (tests/test_infra.py needs it)"
    return found


def run(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def process_names(d: deployment.Deployment) -> set[str]:
    return {p.name for p in d.processes()} | {e.name for e in (*d.services, *d.workers)}


# ---- the image ---------------------------------------------------------------------------------------------------


def test_dockerfile_lints_clean_and_runs_as_a_user() -> None:
    result = run(tool("hadolint"), "--no-color", "infra/Dockerfile")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    text = (INFRA / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) == 2 and all("slim" in s for s in stages)  # build tools stay in the build stage
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 10001:10001$", final, re.M) and "build-essential" not in final
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / source).exists(), source
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # nothing but what the image installs goes into the context


# ---- docker-compose ----------------------------------------------------------------------------------------------


def compose(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(tool("docker-compose"), "-f", "infra/compose.yaml", "config", env={**os.environ, **env})


def test_compose_file_is_valid_and_runs_the_cluster_deployment() -> None:
    result = compose({"NATS_ROUTE_PASSWORD": "route-secret", "POSTGRES_PASSWORD": "pg-secret"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"nats-1", "nats-2", "nats-3", "postgres", "redis", "gateway-1", "gateway-2", "registry", "router",
            "metering", "llm", "asr", "tts", "prometheus", "alertmanager", "grafana"} <= set(services)
    names = process_names(CLUSTER)
    for name, svc in services.items():
        command = svc.get("command") or []
        if command[:1] == ["run"]:  # each InferBus container runs one process of the deployment file
            assert command[1] in names and command[2:] == ["--config", "/etc/inferbus/inferbus.toml"], name
    routes = {services[f"nats-{i}"]["environment"]["NATS_ROUTE_2"] for i in (1, 2, 3)}
    assert routes == {"nats-route://route:route-secret@nats-2:6222"}
    assert {services[f"nats-{i}"]["environment"]["NATS_SERVER_NAME"] for i in (1, 2, 3)} == {"nats-1", "nats-2",
                                                                                              "nats-3"}
    for mount in ("examples/cluster.toml", "prometheus", "alertmanager", "grafana/provisioning", "grafana/dashboards"):
        assert (INFRA / mount).exists(), mount
    missing = compose({"POSTGRES_PASSWORD": "pg-secret", "NATS_ROUTE_PASSWORD": ""})
    assert missing.returncode != 0 and "NATS_ROUTE_PASSWORD" in missing.stderr


# ---- Kubernetes --------------------------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def test_kubernetes_manifests_validate(tmp_path: Path) -> None:
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *map(str, sorted((INFRA / "k8s").glob("*.yaml"))))
    assert result.returncode == 0 and "ERROR" not in result.stdout, result.stdout + result.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    nats = docs["StatefulSet", "nats"]["spec"]
    assert nats["replicas"] == 3 and nats["volumeClaimTemplates"]
    env = {e["name"]: e for e in nats["template"]["spec"]["containers"][0]["env"]}
    assert [env[f"NATS_ROUTE_{i}"]["value"] for i in (1, 2, 3)] == [
        f"nats-route://route:$(NATS_ROUTE_PASSWORD)@nats-{i}.nats:6222" for i in (0, 1, 2)]
    assert "secretKeyRef" in env["NATS_ROUTE_PASSWORD"]["valueFrom"]
    assert docs["Deployment", "gateway"]["spec"]["replicas"] == 2
    hpa = docs["HorizontalPodAutoscaler", "llm"]["spec"]
    scaled_on = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert scaled_on == ["inferbus_llm_in_flight", "inferbus_llm_requests_waiting"]  # queue depth
    served = adapter_metrics(docs["ConfigMap", "inferbus-prometheus-adapter"])
    assert served == {"inferbus_llm_in_flight": "inferbus_llm_in_flight",
                      "inferbus_llm_requests_waiting": "vllm:num_requests_waiting"}
    # The ConfigMap's deployment file passes the check, and every pod runs one of its processes.
    text = docs["ConfigMap", "inferbus-config"]["data"]["inferbus.toml"]
    path = tmp_path / "inferbus.toml"
    path.write_text(text)
    k8s = config.checked(path)
    assert k8s.nats.replicas == 3 and "nats-0.nats:4222" in k8s.nats.url
    for (kind, name), doc in docs.items():
        if kind == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            args = pod["containers"][0]["args"]
            assert args[:2] == ["run", name] and name in process_names(k8s), name
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def adapter_metrics(config_map: dict[str, Any]) -> dict[str, str]:
    """The custom metrics prometheus-adapter's rules serve, each with the exported series it reads; every rule
    maps a series that carries a pod to that pod, and aggregates by what the adapter asks for."""
    metrics = exported()
    out = {}
    for rule in yaml.safe_load(config_map["data"]["config.yaml"])["rules"]:
        query = rule["seriesQuery"]
        found = re.fullmatch(r'\{__name__="([^"]+)",(.*)\}|([a-z_]+)\{(.*)\}', query)
        assert found, query
        name, matchers = (found[1], found[2]) if found[1] else (found[3], found[4])
        assert set(re.findall(r'(\w+)!=""', matchers)) == {"namespace", "pod"}, query
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.fullmatch(rule["name"]["matches"], name), rule["name"]
        assert all(t in rule["metricsQuery"] for t in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"))
        assert name in metrics, f"{name} is not exported by any service"
        out[rule["name"]["as"]] = name
    return out


# ---- systemd -----------------------------------------------------------------------------------------------------


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    units = tmp_path
    for unit in (INFRA / "systemd").iterdir():  # installed as infra/systemd/README.md says, in this venv
        (units / unit.name).write_text(unit.read_text().replace("/opt/inferbus/venv", str(VENV_BIN.parent)))
    names = ["inferbus@gateway.service", "inferbus@llm.service", "inferbus-nats.service", "inferbus-up.service",
             "inferbus.target"]
    result = run(analyze, "verify", *names, cwd=units)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # The check bites: a misspelt setting is reported.
    broken = units / "inferbus@.service"
    broken.write_text(broken.read_text().replace("Restart=always", "Restart=sometimes"))
    result = run(analyze, "verify", "inferbus@gateway.service", cwd=units)
    assert "restart specifier" in result.stderr


# ---- NATS cluster config -----------------------------------------------------------------------------------------


def test_cluster_config_has_the_embedded_accounts_and_parses(tmp_path: Path) -> None:
    secrets = Secrets(tmp_path / "secrets").ensure()
    auth = config.nats_auth(secrets)
    embedded = server_config(secrets)
    assert auth.split("\n", 1)[1] == embedded.split("\n", 1)[1]  # everything but the listener, verbatim
    (tmp_path / "secrets" / "auth.conf").write_text(auth)
    shutil.copy(INFRA / "nats/cluster.conf", tmp_path / "cluster.conf")
    env = {**os.environ, "NATS_SERVER_NAME": "n1", "NATS_LISTEN": "127.0.0.1:4222", "NATS_HTTP": "127.0.0.1:8222",
           "NATS_CLUSTER_LISTEN": "127.0.0.1:6222", "NATS_ROUTE_PASSWORD": "pw", "NATS_STORE_DIR": str(tmp_path / "js"),
           **{f"NATS_ROUTE_{i}": f"nats-route://route:pw@127.0.0.1:{6221 + i}" for i in (1, 2, 3)}}
    result = run(_nats_binary(), "-t", "-c", str(tmp_path / "cluster.conf"), env=env)
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, result.stderr
    # What `inferbus config secrets` makes parses; a password that starts like a number or a date (which
    # token_urlsafe could make: "-z...", "123-z...") stops nats-server, so the generator starts with a letter.
    for password, valid in ((config.new_route_password(), True), (config.new_route_password(), True),
                            ("-zK4abc", False), ("123-zK4", False)):
        assert config.new_route_password()[0].isalpha()
        env["NATS_ROUTE_PASSWORD"] = password
        result = run(_nats_binary(), "-t", "-c", str(tmp_path / "cluster.conf"), env=env)
        assert (result.returncode == 0) == valid, (password, result.stderr)
    del env["NATS_ROUTE_PASSWORD"]
    assert run(_nats_binary(), "-t", "-c", str(tmp_path / "cluster.conf"), env=env).returncode != 0


# ---- Prometheus and Alertmanager ---------------------------------------------------------------------------------


def test_prometheus_rules_check_and_their_unit_tests_pass() -> None:
    prom = INFRA / "prometheus"
    for argv in (("check", "config", "prometheus.yml"), ("check", "rules", "rules/inferbus.yml"),
                 ("test", "rules", "tests/inferbus.test.yml")):
        result = run(tool("promtool"), *argv, cwd=prom)
        assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load((prom / "rules/inferbus.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tested = set(re.findall(r"alertname: (\w+)", (prom / "tests/inferbus.test.yml").read_text()))
    assert alerts == tested  # every alert has a unit test
    assert {"InferBusHighErrorRate", "InferBusHighHttpErrorRate", "InferBusSlowFirstToken", "InferBusQueueSaturated",
            "InferBusWorkerDown", "InferBusServiceDown", "InferBusCanaryRolledBack", "InferBusMeteringLag",
            "InferBusBudgetExhausted", "InferBusCircuitOpen", "InferBusNatsUnreachable", "InferBusBudgetNearlySpent",
            "InferBusNatsDisconnected"} <= alerts
    exprs = expressions()  # the state gauges, not their side effects (refusals, publish retries)
    assert "inferbus_circuit_breaker_open" in exprs["rule InferBusCircuitOpen"]
    assert "inferbus_nats_connected" in exprs["rule InferBusNatsDisconnected"]
    assert "inferbus_budget_remaining" in exprs["rule InferBusBudgetNearlySpent"]
    assert "inferbus_http_responses_total" in exprs["rule inferbus:http_5xx_ratio:rate5m"]
    # A worker or a service gone, whatever the scrape job is called (compose, Kubernetes pod discovery, systemd):
    # told apart by the metrics they export, never by a job name. The worker gauges named are every worker's.
    workers = {f"inferbus_{kind}_in_flight" for kind in re.findall(
        r"inferbus_\(([a-z|]+)\)_in_flight", exprs["rule InferBusWorkerDown"])[0].split("|")}
    assert workers == {n for n in exported() if re.fullmatch(r"inferbus_[a-z]+_in_flight", n)}
    for alert in ("InferBusWorkerDown", "InferBusServiceDown"):
        assert "job" not in re.sub(r"on \(job, instance\)", "", exprs[f"rule {alert}"]), alert
    result = run(tool("amtool"), "check-config", str(INFRA / "alertmanager/alertmanager.yml"))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


# ---- every metric named is exported ------------------------------------------------------------------------------

_KINDS = {"Counter", "Gauge", "Histogram", "Summary"}


def exported() -> dict[str, set[str]]:
    """Every sample name the services' prometheus_client metrics expose, with its label names."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in _KINDS
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue
            kind = getattr(node.func, "id", getattr(node.func, "attr", ""))
            name = node.args[0].value
            label_node = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            labels = {str(e.value) for e in getattr(label_node, "elts", []) if isinstance(e, ast.Constant)}
            if kind == "Counter":
                base = name.removesuffix("_total")
                names = {base + "_total": labels, base + "_created": labels}
            elif kind == "Histogram":
                names = {name + "_bucket": labels | {"le"}, name + "_sum": labels, name + "_count": labels}
            else:
                names = {name: labels, name + "_sum": labels, name + "_count": labels} if kind == "Summary" else {
                    name: labels}
            for sample, labs in names.items():
                out.setdefault(sample, set()).update(labs)
    return out


def expressions() -> dict[str, str]:
    """Every PromQL expression in infra/: rules and dashboard panels, by where it is."""
    out = {}
    for group in yaml.safe_load((INFRA / "prometheus/rules/inferbus.yml").read_text())["groups"]:
        for rule in group["rules"]:
            out[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    for path in sorted((INFRA / "grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out[f"{path.stem}: {panel['title']} ({target['refId']})"] = target["expr"]
    return out


def test_every_rule_and_panel_names_exported_metrics_and_labels() -> None:
    metrics = exported()
    assert "outcome" in metrics["inferbus_llm_requests_total"]
    # The LLM worker's vLLM names (what dashboards and autoscalers made for vLLM query), labelled as vLLM does.
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert "model_name" in metrics[name], name
    scrape = {"up": {"job", "instance", "service"}}
    exprs = expressions()
    recorded = {where.removeprefix("rule ") for where in exprs if where.startswith("rule inferbus:")}
    for where, expr in exprs.items():
        names = re.findall(r"\b(inferbus_[a-z0-9_]+|vllm:[a-z0-9_:]+)", expr)
        uses = set(re.findall(r"\b(inferbus:[a-z0-9_:]+)", expr))
        assert uses <= recorded, f"{where}: {uses - recorded} is not a recording rule"
        assert names or uses or re.search(r"\bup\b", expr), where
        for name in names:
            assert name in metrics, f"{where}: {name} is not exported by any service"
        for name, matchers in re.findall(r"\b(inferbus_[a-z0-9_]+|vllm:[a-z0-9_:]+|up)\{([^}]*)\}", expr):
            known = metrics.get(name) or scrape.get(name, set())
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in known | {"instance", "job", "service"}, f"{where}: {name} has no label {label}"
        for clause in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (s.strip() for s in clause.split(",")):
                exported_labels = set().union(*(metrics.get(n, set()) for n in names)) | {"instance", "job",
                                                                                          "service", "le"}
                assert label in exported_labels, f"{where}: grouped by {label}, which its metrics lack"


def test_every_panel_is_proven_with_data_or_said_why_not() -> None:
    """tests/test_cluster.py proves the panels in PANELS_WITH_DATA have data on a running platform; the others
    are listed with why not. A new panel goes in one of the two."""
    from tests.test_cluster import PANELS_WITH_DATA, PANELS_WITHOUT_DATA

    every = {(path.stem, panel["title"]) for path in sorted((INFRA / "grafana/dashboards").glob("*.json"))
             for panel in json.loads(path.read_text())["panels"]}
    proven = {(board, title) for board, titles in PANELS_WITH_DATA.items() for title in titles}
    without = {(board, title) for board, titles in PANELS_WITHOUT_DATA.items() for title in titles}
    assert not proven & without, proven & without
    assert proven | without == every, every ^ (proven | without)


def test_dashboards_cover_what_operators_look_at() -> None:
    boards = {p.stem: json.loads(p.read_text()) for p in (INFRA / "grafana/dashboards").glob("*.json")}
    assert set(boards) == {"inferbus-overview", "inferbus-models", "inferbus-errors", "inferbus-canary",
                           "inferbus-limits-spend", "inferbus-workers"}
    titles = " | ".join(p["title"].lower() for b in boards.values() for p in b["panels"])
    for topic in ("latency", "time to first token", "tokens per second", "error", "by version", "refusals",
                  "spend by tenant", "in flight", "real-time factor", "budget left", "circuit breakers open",
                  "nats connections", "http errors by status and code"):
        assert topic in titles, topic
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and board["uid"] == name
        assert all(t["datasource"]["uid"] == "${datasource}" for p in board["panels"] for t in p["targets"])
    provisioning = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/inferbus.yml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_readme_and_examples_point_into_infra() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in ("infra/examples/", "infra/compose.yaml", "infra/k8s/", "infra/systemd/", "infra/nats/cluster.conf",
                 "infra/prometheus/", "infra/grafana/"):
        assert path in readme, path
        assert (ROOT / path).exists(), path
    tomllib.loads((INFRA / "examples/cluster.toml").read_text())


@pytest.mark.parametrize("example", sorted(p.name for p in (INFRA / "examples").glob("*.toml")))
def test_each_example_checks_from_the_command_line(example: str) -> None:
    result = run(sys.executable, "-m", "services.cli.main", "config", "check", f"infra/examples/{example}")
    assert result.returncode == 0 and result.stdout.startswith(f"infra/examples/{example}: ok"), result.stderr

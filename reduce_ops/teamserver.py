"""A team tracking server: PostgreSQL as MLflow's backend store, artifacts served by MLflow.

`reduce-ops server` (or `make server`) starts both on this machine and keeps them up until
Ctrl-C; pipelines on any machine then run with MLFLOW_TRACKING_URI=http://HOST:PORT. PostgreSQL
comes from the distribution's packages (installed with apt-get when missing and allowed); its
cluster lives in DIR/postgres, the artifacts in DIR/artifacts, the logs in DIR/*.log.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reduce_ops.errors import ReduceOpsError

PG_USER = "reduce_ops"
PG_DATABASE = "mlflow"
SYSTEM_USER = "postgres"      # initdb refuses to run as root; as root the cluster runs as this


def postgres_bin(install: bool = False) -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl); with `install`, apt-get
    installs PostgreSQL first when it is missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    if not found and install:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise ReduceOpsError("PostgreSQL is not installed: run `apt-get install "
                                 "postgresql` as root, then again")
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ,
                                                       "DEBIAN_FRONTEND": "noninteractive"})
        return postgres_bin(install=False)
    if not found:
        raise ReduceOpsError("PostgreSQL is not installed (no initdb): `apt-get install "
                             "postgresql`")
    return Path(found[-1]).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    """Run as the postgres system user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", SYSTEM_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _give_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
        # the owner must be able to reach the folder: every parent needs o+x
        for parent in path.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise ReduceOpsError(f"{path}: PostgreSQL (user {SYSTEM_USER}) cannot reach "
                                     f"it because {parent} is closed to other users; choose a "
                                     f"folder outside it (--dir)")


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL cluster on 127.0.0.1:port with data in `data`."""

    bin: Path
    data: Path
    port: int

    @property
    def uri(self) -> str:
        # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def start(self, log: Path) -> None:
        """initdb on first use (trust auth on loopback only), start, create the database."""
        self.data.parent.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").is_file():
            self.data.mkdir(exist_ok=True)
            _give_to_owner(self.data)
            _run(_as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_USER,
                            "--auth=trust", "-E", "UTF8", "--no-instructions"]), "initdb")
        log.touch()
        _give_to_owner(log)
        _run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w",
                        "-o", f"-p {self.port} -k {self.data} -h 127.0.0.1", "start"]),
             f"PostgreSQL on 127.0.0.1:{self.port} (log: {log})")
        exists = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
             "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{PG_DATABASE}'"],
            capture_output=True, text=True, check=False).stdout.strip()
        if exists != "1":
            _run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                  PG_USER, PG_DATABASE], "createdb")

    def stop(self) -> None:
        subprocess.run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                  "-w", "stop"]), capture_output=True, check=False)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ReduceOpsError(f"{what}: failed ({last[0]})")


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 200 (the MLflow server's /health)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ReduceOpsError(f"the MLflow server exited with code {proc.returncode} "
                                 f"before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ReduceOpsError(f"{url} did not answer within {timeout:.0f} s")


@contextmanager
def team_server(folder: Path, port: int, pg_port: int, install: bool = False,
                timeout: float = 120.0) -> Iterator[str]:
    """PostgreSQL and `mlflow server` (served artifacts in folder/artifacts) on 127.0.0.1, up
    for the block; yields the tracking URI http://127.0.0.1:port. Both stop afterwards."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pg = Postgres(postgres_bin(install), folder / "postgres", pg_port)
    pg.start(folder / "postgres.log")
    server = None
    try:
        log = (folder / "mlflow-server.log").open("ab")   # noqa: SIM115 - the server's lifetime
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", pg.uri,
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "2"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID")}
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", timeout, server)
        yield uri
    finally:
        try:
            _stop(server)
        finally:
            pg.stop()


def _stop(server: subprocess.Popen | None) -> None:
    """Stop the MLflow server and its workers (its own process group)."""
    if server is not None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)        # the server and its workers
                server.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def run(folder: Path, port: int, pg_port: int) -> int:
    """`reduce-ops server`: serve until Ctrl-C."""
    with team_server(folder, port, pg_port, install=True) as uri:
        print(f"server: MLflow at {uri} (backend store PostgreSQL on 127.0.0.1:{pg_port}, "
              f"artifacts in {folder / 'artifacts'}); run pipelines with "
              f"MLFLOW_TRACKING_URI={uri}. Ctrl-C stops both.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("server: stopping", flush=True)
    return 0

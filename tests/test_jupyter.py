"""`kedro jupyter lab` and `kedro jupyter notebook` start after the project's install."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


@pytest.mark.slow
@pytest.mark.parametrize("front_end", ["lab", "notebook"])
def test_kedro_jupyter_starts_with_the_projects_kernel(front_end, tmp_path):
    port, token = _free_port(), "cartridges-test"
    kedro = Path(sys.executable).with_name("kedro")
    command = [str(kedro), "jupyter", front_end, "--no-browser", "--ip", "127.0.0.1"]
    command += ["--port", str(port), f"--IdentityProvider.token={token}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers often run as root; Jupyter refuses it
    environment = os.environ | {"KEDRO_DISABLE_TELEMETRY": "1", "JUPYTER_DATA_DIR": str(tmp_path)}
    log = (tmp_path / "jupyter.log").open("w")
    server = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status = _get_json(f"http://127.0.0.1:{port}/api/status", token)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        output = (tmp_path / "jupyter.log").read_text()
        assert status is not None, f"jupyter {front_end} did not start:\n{output[-3000:]}"
        kernels = _get_json(f"http://127.0.0.1:{port}/api/kernelspecs", token)
        assert kernels["default"] == "kedro_cartridges", kernels["default"]
        assert "kedro_cartridges" in kernels["kernelspecs"]
    finally:
        _stop(server, port)
        log.close()


def _stop(server: subprocess.Popen, port: int) -> None:
    """Stop ``kedro jupyter`` and the Jupyter server it started (found by its unique port)."""
    marker = f"--port\x00{port}\x00".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()

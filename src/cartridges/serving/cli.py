"""``cartridges-serve`` and ``cartridges-chat``: the server and a terminal chat, from conf/.

Settings come from the Kedro project's configuration (``conf/base`` then ``conf/<env>``):
``params:serving``, ``params:model`` and the catalog's cartridge dataset, so that the server
serves exactly what ``kedro run`` trained. Flags override them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cartridges.params import validate_parameters
from cartridges.serving.config import ServingConfig

logger = logging.getLogger(__name__)

API_KEY_ENV = "CARTRIDGES_API_KEY"


def load_project_config(
    project_dir: str | Path = ".", env: str | None = None, **overrides: Any
) -> ServingConfig:
    """The serving config from a Kedro project's ``conf/``; relative paths become absolute."""
    from kedro.config import OmegaConfigLoader

    project_dir = Path(project_dir).resolve()
    loader = OmegaConfigLoader(
        conf_source=str(project_dir / "conf"), base_env="base", default_run_env="local", env=env
    )
    parameters = loader["parameters"]
    # The project's one parameter check: a misspelt serving key names the closest valid one.
    validate_parameters(
        {name: parameters[name] for name in ("serving", "model") if name in parameters}
    )
    serving = dict(parameters.get("serving") or {})
    model = dict(parameters.get("model") or {})
    catalog = loader["catalog"]
    dataset_names = serving.pop("catalog_datasets", None) or ["cartridge"]
    serving["catalog_datasets"] = {
        name: str(_absolute(project_dir, path))
        for name in dataset_names
        if (path := _filepath(catalog.get(name) or {}))
    }
    if serving.get("cartridge_dir"):
        serving["cartridge_dir"] = str(_absolute(project_dir, serving["cartridge_dir"]))
    if not serving.get("served_model_name") and model.get("name_or_path"):
        serving["served_model_name"] = str(model["name_or_path"])  # as written in conf/
    local_model = project_dir / str(model.get("name_or_path", ""))
    if model.get("name_or_path") and local_model.exists():
        model["name_or_path"] = str(local_model)
    return ServingConfig.from_params(serving, model, **overrides)


def _filepath(entry: dict) -> str | None:
    """A catalog entry's filepath, also through a wrapper (``dataset:``, e.g. MLflow logging)."""
    return entry.get("filepath") or (entry.get("dataset") or {}).get("filepath")


def _absolute(project_dir: Path, path: str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else project_dir / path


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project-dir", default=".", help="the Kedro project (default: .)")
    parser.add_argument("--env", default=None, help="Kedro config environment (default: local)")
    parser.add_argument("--model", default=None, help="override model.name_or_path")
    parser.add_argument("--device", default=None, help="override model.device (cpu, cuda, auto)")
    parser.add_argument("--cartridge-dir", default=None, help="override serving.cartridge_dir")


def _load(args: argparse.Namespace, **overrides: Any) -> ServingConfig:
    return load_project_config(
        args.project_dir,
        args.env,
        model_name_or_path=args.model,
        device=args.device,
        cartridge_dir=args.cartridge_dir,
        **overrides,
    )


# --------------------------------------------------------------------------- serve
def serve_main(argv: list[str] | None = None) -> None:
    """Start the OpenAI-compatible server in the foreground."""
    parser = argparse.ArgumentParser(
        prog="cartridges-serve",
        description="Serve the project's model and cartridges over an OpenAI-compatible API.",
    )
    _config_arguments(parser)
    parser.add_argument("--host", default=None, help="override serving.host")
    parser.add_argument("--port", type=int, default=None, help="override serving.port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this Bearer key (default: ${API_KEY_ENV}, else serving.api_key)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from cartridges.serving.app import create_app
    from cartridges.serving.server import serve

    config = _load(args, host=args.host, port=args.port, api_key=args.api_key)
    serve(create_app(config), config.host, config.port)


# --------------------------------------------------------------------------- chat
def _chat_parser() -> argparse.ArgumentParser:
    from cartridges.serving.terminal import HISTORY_FILE

    parser = argparse.ArgumentParser(
        prog="cartridges-chat",
        description="Interactive chat with a cartridge (history kept, answers streamed).",
    )
    _config_arguments(parser)
    parser.add_argument(
        "-c",
        "--cartridge",
        action="append",
        default=[],
        help="cartridge id (catalog name[@version] or file in the cartridge dir); repeat to "
        "compose several, in order",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="base URL of a running server, e.g. http://127.0.0.1:8000/v1 (default: load the "
        "model in this process)",
    )
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help="Bearer key")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length cap")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampled answers")
    parser.add_argument(
        "--system",
        default=None,
        help="system message (only without cartridges, which stand in for it)",
    )
    parser.add_argument(
        "--history-file",
        default=HISTORY_FILE,
        help=f"where the prompt's line history is kept (default: {HISTORY_FILE}; '' = none)",
    )
    return parser


def chat_main(argv: list[str] | None = None) -> None:
    """Chat with a cartridge in the terminal, through a running server or an in-process one.

    The server and the cartridges are checked before the first prompt: a refusal ends the
    command with one line on stderr and exit status 1. Ctrl-C or Ctrl-D end it with status 0.
    """
    parser = _chat_parser()
    args = parser.parse_args(argv)
    if args.system is not None and args.cartridge:
        parser.error(
            "--system cannot be combined with -c/--cartridge: a cartridge stands in for the "
            "system message (the KV of the system turn that carried the corpus). Put "
            "instructions in your first message instead."
        )
    logging.basicConfig(level=logging.WARNING)
    from openai import OpenAI

    from cartridges.serving.terminal import ChatSetupError, check_cartridges, served_model

    options = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        system=args.system,
    )
    try:
        if args.url:
            client = OpenAI(base_url=args.url, api_key=args.api_key or "none")
            model = served_model(client)
            check_cartridges(client, model, args.cartridge)
            _chat(client, model, args, options)
            return
        from cartridges.serving.app import create_app
        from cartridges.serving.server import BackgroundServer

        config = _load(args, api_key=None)
        with BackgroundServer(create_app(config)) as server:
            client = OpenAI(base_url=server.base_url, api_key="none")
            check_cartridges(client, config.model_id, args.cartridge)
            _chat(client, config.model_id, args, options)
    except ChatSetupError as error:
        print(f"cartridges-chat: {error}", file=sys.stderr)  # noqa: T201 - CLI output
        sys.exit(1)
    except KeyboardInterrupt:  # while starting up: no traceback
        sys.exit(130)


def _chat(client, model: str, args: argparse.Namespace, options: dict) -> None:
    from cartridges.serving.terminal import HELP, chat_loop, line_editing

    with line_editing(args.history_file):
        print(HELP)  # noqa: T201 - CLI output
        chat_loop(client, model, args.cartridge, **options)

"""The project's ``kedro run``: Kedro's own, with a ``--params`` that takes lists and mappings.

Kedro splits ``--params`` on every comma, so ``base_urls=[http://a/v1,http://b/v1]`` fails with
"must contain a key and a value". Here a comma splits items only outside brackets, braces and
quotes; each value is read as YAML, as Kedro reads it (``[4, 16]`` is a list, ``{a: 1}`` a
mapping, ``0.5`` a float). Everything else is Kedro's command unchanged, including
``--config FILE`` (a ``run:`` section whose ``params`` may be a nested mapping). Kedro loads this
module's ``cli`` group over its built-in commands.
"""

from __future__ import annotations

import copy
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run
from omegaconf import OmegaConf

_OPENING = {"[": "]", "{": "}"}


def split_items(text: str) -> list[str]:
    """``text`` split on the commas outside brackets, braces and quotes; empty items dropped.

    Raises:
        ValueError: a bracket or quote is not closed, or closed without being opened.
    """
    items, current, expected, quote = [], [], [], ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in _OPENING:
            expected.append(_OPENING[char])
        elif char in "]}":
            if not expected or expected.pop() != char:
                raise ValueError(f"'{char}' closes nothing that was opened in: {text}")
        elif char == "," and not expected:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote or expected:
        missing = quote or "".join(reversed(expected))
        raise ValueError(f"Unclosed in --params (missing {missing!r}): {text}")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_params(text: str) -> dict[str, Any]:
    """``key.path=value,...`` as a nested mapping; values read as YAML.

    Raises:
        ValueError: an item has no ``=`` or an empty key, or brackets do not match.
    """
    dot_list = []
    for item in split_items(text):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"Item '{item}' must be a key and a value separated by '='.")
        if not key.strip():
            raise ValueError(f"Item '{item}' has an empty key.")
        dot_list.append(f"{key.strip()}={value}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(dot_list))


def _params_callback(ctx: click.Context, param: click.Parameter, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):  # from --config FILE, already a mapping
        return value
    try:
        return parse_params(value or "")
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


def _with_list_params(command: click.Command) -> click.Command:
    """A copy of ``command`` whose ``--params`` option parses with :func:`parse_params`."""
    params = []
    for option in command.params:
        if option.name == "params":
            option = copy.copy(option)
            option.callback = _params_callback
            option.help = (
                "Parameters to override, key=value pairs separated by commas; values are YAML, "
                "so lists and mappings work: a.b=[x,y],c={d: 1}"
            )
        params.append(option)
    replaced = copy.copy(command)
    replaced.params = params
    return replaced


@click.group(name="cartridges")
def cli() -> None:
    """Project commands of cartridges."""


# Module level: `python -m cartridges` (Kedro's find_run_command) takes `run` from here.
run = _with_list_params(kedro_run)
cli.add_command(run, name="run")

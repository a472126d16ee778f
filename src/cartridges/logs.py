"""Known third-party noise, silenced by name so that what is left on screen is worth reading.

Every ``kedro`` command otherwise opens with a dozen warnings from the libraries the project is
built on (MLflow asking for type hints on a class the project never defines, OmegaConf's resolver
API rename inside Kedro and kedro-mlflow, Kedro noting that it will not validate the project's
``Params | dict`` node arguments, which the project validates itself in ``params.py``). None of
them is actionable by a user, and one prints raw ANSI colour codes into redirected logs.

Each entry names the library that warns and the start of its message; nothing else is hidden, in
particular no warning raised from the project's own modules. Installed from ``settings.py``
(every Kedro session) and by the project's own command-line entry points. Two mechanisms are
needed: ``warnings`` filters, and a filter on the ``py.warnings`` logger for MLflow's warning,
which MLflow raises under its own ``simplefilter("once")`` (overriding any filter) and Kedro
routes to logging. A plain ``kedro`` command still shows that one warning once: Kedro loads
kedro-mlflow's command-line plugin, which raises it, before any project code runs.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """A third-party warning: where it is raised (a module regex) and how its message starts."""

    module: str
    message: str
    category: type[Warning] = Warning
    why: str = ""


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        r"mlflow\.",
        r"(\x1b\[\d+m)?Add type hints to the `predict` method",  # MLflow colours its text
        UserWarning,
        "raised when MLflow imports its pyfunc module; the project defines no PythonModel",
    ),
    KnownWarning(
        r"(kedro|kedro_mlflow)\.",
        r"register_new_resolver\(\) is deprecated",
        UserWarning,
        "Kedro and kedro-mlflow still call OmegaConf's old resolver API",
    ),
)

KNOWN_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    # Kedro's own parameter validation skips `Params | dict` hints; params.py validates them.
    "kedro.validation.type_extractor": ("Union type hint (",),
    # Kedro's validator finds no pydantic-typed node arguments and says it returns the parameters
    # unchecked; the project's ParametersHook checks them and logs "Parameters checked: ...".
    "kedro.validation.parameter_validator": ("No typed parameter requirements found",),
}


class _KnownWarningRecords(logging.Filter):
    """Drops known warnings that reach logging through ``logging.captureWarnings``."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(
            f"{known.category.__name__}: " in text
            and re.search(rf"{known.category.__name__}: {known.message}", text)
            for known in KNOWN_WARNINGS
        )


class _KnownRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Ignore exactly the listed third-party warnings and log records (idempotent)."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=known.message, category=known.category, module=known.module
        )
    for name, prefixes in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownRecords) for f in logger.filters):
            logger.addFilter(_KnownRecords(prefixes))
    captured = logging.getLogger("py.warnings")
    if not any(isinstance(f, _KnownWarningRecords) for f in captured.filters):
        captured.addFilter(_KnownWarningRecords())

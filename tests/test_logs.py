"""Known third-party warnings are silenced by name; the project's own are not."""

import logging
import subprocess
import sys
import warnings

from kedro.config import OmegaConfigLoader

from cartridges.logs import quiet_known_warnings


def _output_of(code: str) -> str:
    """What a fresh interpreter prints (Kedro's log handler writes warnings to stdout)."""
    command = [sys.executable, "-W", "default", "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return result.stdout + result.stderr


def test_mlflows_coloured_type_hint_warning_is_silenced():
    noisy = "import kedro_mlflow.mlflow"
    assert "Add type hints" in _output_of(noisy)  # the warning exists without the filter
    quiet = _output_of(
        f"from cartridges.logs import quiet_known_warnings\nquiet_known_warnings()\n{noisy}"
    )
    assert "Add type hints" not in quiet and "\x1b[" not in quiet


def test_resolver_deprecations_are_silenced_but_the_projects_own_warnings_are_not(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        OmegaConfigLoader(str(tmp_path), custom_resolvers={"twice": lambda x: 2 * x})
        warnings.warn("a warning of the project's own", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("register_new_resolver" in m for m in messages), messages
    assert "a warning of the project's own" in messages


def test_kedros_union_hint_note_is_dropped_and_its_other_records_kept(caplog):
    quiet_known_warnings()
    logger = logging.getLogger("kedro.validation.type_extractor")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.warning("Union type hint (%s) is not supported for validation.", "Params | dict")
        logger.warning("Could not extract type hints from function %s", "f")
    assert [r.getMessage() for r in caplog.records] == [
        "Could not extract type hints from function f"
    ]


def test_kedros_unchecked_parameters_line_is_dropped_and_the_projects_check_is_logged(
    caplog,
):
    """Kedro says it returns the parameters unchecked; the project's hook does check them."""
    from cartridges.params import ParametersHook

    quiet_known_warnings()
    kedro_logger = logging.getLogger("kedro.validation.parameter_validator")
    with caplog.at_level(logging.INFO):
        kedro_logger.info("No typed parameter requirements found, returning original parameters")

        class Catalog(dict):
            def load(self, name):
                return self[name]

        class Pipeline:
            def inputs(self):
                return {"params:distill_training", "corpus"}

        ParametersHook().before_pipeline_run(
            {}, Pipeline(), Catalog(parameters={"distill_training": {}})
        )
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Parameters checked: distill_training."]

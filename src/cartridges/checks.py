"""Every problem of a config at once: checks collect their messages and raise them together.

A config's ``__post_init__`` that raised at its first bad value made a user fix a run's
parameters one failed run at a time; :class:`Problems` gathers them and raises one
``ValueError`` whose lines are the problems (``cartridges.params`` reports each line as its own).
"""

from __future__ import annotations


class Problems(list[str]):
    """The problems found so far; :meth:`raise_any` raises them together."""

    def require(self, ok: bool, message: str) -> None:
        """Record ``message`` unless ``ok``."""
        if not ok:
            self.append(message)

    def at_least(self, config: object, minimum: int, *names: str, prefix: str = "") -> None:
        """Record each field of ``names`` whose value is below ``minimum``."""
        for name in names:
            value = getattr(config, name)
            self.require(value >= minimum, f"{prefix}{name} must be >= {minimum}, got {value}.")

    def raise_any(self) -> None:
        if self:
            raise ValueError("\n".join(self))

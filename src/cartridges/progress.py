"""Progress bars that stay readable in log files as well as on terminals."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(*args, **kwargs) -> tqdm:
    """A ``tqdm`` bar; when stderr is not a terminal it redraws at most every 30 seconds.

    Rate (items/s) and ETA are tqdm's; a log file gets a handful of lines, not thousands.
    """
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(*args, **kwargs)

"""One base for every error a user can fix: a bad config key, a missing file, a checkpoint that does not
fit, a run that diverged. Its message names the fix. Every entry point catches :class:`UserError` once,
prints ``error: <message>`` and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error in the user's input or run, with the fix in its message. ``exit_code`` is what a CLI returns."""

    exit_code = 1


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a command's ``main``; a :class:`UserError` (or a missing file) prints ``error: <message>`` and
    returns its exit status instead of a traceback. For one-process commands; recipes use
    :func:`aqa.runtime.recipe.recipe_main`."""
    try:
        main(argv)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 1)
    return 0

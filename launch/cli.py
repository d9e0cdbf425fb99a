"""`run(main, module)`: `app.run` for a launcher, as `python -m` or script.

The console scripts `tf-breakeven-train`, `-sweep` and `-report` (see
pyproject.toml) run a generated wrapper as `__main__`, so absl's `--help`
would show neither the launcher's docstring nor its flags; `run` gives the
wrapper both, so every entry point prints the same help.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags


def run(main: Callable[[list[str]], None], module: str) -> None:
    """`app.run(main)`, with `module`'s docstring and flags in `--help`."""
    main_module = sys.modules["__main__"]
    if main_module is not sys.modules[module]:
        main_module.__doc__ = sys.modules[module].__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)

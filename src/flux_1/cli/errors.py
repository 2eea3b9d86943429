"""Error handling shared by the console scripts: a clear message and a non-zero exit, no traceback.

Argument mistakes go through `argparse` (`parser.error`: usage line, exit status 2). Everything a user
can cause later (a missing or corrupt checkpoint, a gated or uncached Hub repo, an unwritable output)
is raised as one of `USER_ERRORS` and printed by `user_errors()` as `error: ...` with exit status 1.
Hub errors already carry the full instructions and are printed as they are. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from ..loading.hub import HubError
from ..loading.weights import WeightLoadError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class CLIError(Exception):
    """A problem with what the user asked for, found after argument parsing."""


# ValueError covers the pipeline's own checks (and LoRAError); OSError covers unreadable inputs and
# unwritable outputs (FileNotFoundError, PermissionError, disk full, ...).
USER_ERRORS = (CLIError, WeightLoadError, ValueError, OSError)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user-caused exceptions into `SystemExit` with a one-line message; print warnings plainly."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show_warning
        try:
            yield
        except HubError as e:
            print(str(e), file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

"""How the project's command lines report a user's mistake: one line, ``PROG: error: ...``, exit status 1.

Bad input (a missing folder or file, an invalid option value, a missing extra, a Hub refusal) is the user's to
fix, so it gets the message and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["USER_ERRORS", "one_line", "user_errors_exit"]

# ValueError: our own checks and huggingface_hub's validation; OSError: missing or unreadable files (transformers
# raises OSError for a folder without a checkpoint); ImportError: an extra that is not installed.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


def one_line(e: BaseException) -> str:
    """The exception's message with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def user_errors_exit(prog: str, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` (and ``extra``) raised in the block into ``SystemExit("PROG: error: ...")``,
    which Python prints to stderr as one line with exit status 1."""
    try:
        yield
    except USER_ERRORS + extra as e:
        raise SystemExit(f"{prog}: error: {one_line(e)}") from None

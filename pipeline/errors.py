"""The one base class of user-facing errors, and the entry-point wrapper that reports them.

Every error a user can cause (bad data, a bad model file, an unreachable source) derives from
:class:`PipelineError`; ``str(error)`` is one line saying what is wrong and what to do.
:func:`run_entry_point`, which every stage and the ``wbc`` command run through, configures logging
once, turns such errors into ``error: ...`` on stderr and exit code 2, and makes SIGTERM (what
DVC, CI and schedulers send) clean up like Ctrl-C does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT = 2
SIGTERM_EXIT = 128 + signal.SIGTERM
DEBUG_ENV = "WBC_DEBUG"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class PipelineError(Exception):
    """A problem with the user's input or environment; ``str(error)`` is one line."""


class InputError(PipelineError, ValueError):
    """Input data that does not fit the model or the settings (also a ValueError)."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt so ``finally`` blocks clean up."""


def _on_sigterm(main_pid: int) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked worker inherited the handler: just die
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        for child in multiprocessing.active_children():
            child.terminate()
        raise Terminated()
    return handler


def install_sigterm_handler() -> None:
    """Make SIGTERM stop worker processes and raise :class:`Terminated` in the main process."""
    signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def configure_logging() -> None:
    """Log INFO and above to stderr in one format: the set-up every entry point shares.

    Does nothing where logging is configured already (a host application, pytest).
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def run_entry_point(main: Callable[..., int | None], *args: Any, debug: bool | None = None
                    ) -> int:
    """Run ``main(*args)`` and return its exit code: user errors are one line and exit code 2.

    Logging is configured (:func:`configure_logging`) before ``main`` runs. Tracebacks are shown
    only with ``debug`` (``--debug``) or ``WBC_DEBUG=1``.
    """
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") if debug is None else debug
    configure_logging()
    install_sigterm_handler()
    try:
        return int(main(*args) or 0)
    except (PipelineError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except Terminated:
        logging.getLogger(__name__).debug("terminated by SIGTERM")
        print("error: terminated (SIGTERM); temporary files were removed", file=sys.stderr)
        return SIGTERM_EXIT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT

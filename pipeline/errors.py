"""The one base class of user-facing errors, and the entry-point wrapper that reports them.

Every error a user can cause (bad data, a bad model file, an unreachable source) derives from
:class:`PipelineError`; ``str(error)`` is one line saying what is wrong and what to do.
:func:`run_entry_point`, which every stage and the ``wbc`` command run through, configures logging
once, turns such errors (and those of the environment: files, folders, a malformed YAML) into
``error: ...`` on stderr and exit code 2, any other exception into one ``internal error: ...``
line and exit code 3, and makes SIGTERM (what DVC, CI and schedulers send) clean up like Ctrl-C
does. :func:`process_pool` is the one way to start worker processes: they die with their parent.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import yaml

USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 3
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


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In a worker: be killed when the parent process dies, however it dies (SIGKILL too)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: watch the parent instead
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def process_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool (``workers`` processes, default one per CPU) whose workers die with this
    process, even when it is killed with SIGKILL: every pool of the pipeline is made here."""
    return ProcessPoolExecutor(workers or os.cpu_count() or 1, initializer=_die_with_parent,
                               initargs=(os.getpid(),))


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def configure_logging() -> None:
    """Log INFO and above to stderr in one format: the set-up every entry point shares.

    Does nothing where logging is configured already (a host application, pytest).
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


KNOWN_ERRORS = (PipelineError, OSError, yaml.YAMLError)  # the user's input or environment


def _say(line: str) -> None:
    """Print one line to stderr whatever characters it holds (a file name in any encoding)."""
    stream = sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
    stream.flush()


def run_entry_point(main: Callable[..., int | None], *args: Any, debug: bool | None = None
                    ) -> int:
    """Run ``main(*args)`` and return its exit code: every error is one line on stderr.

    Errors of the user's input or environment (:data:`KNOWN_ERRORS`) exit with code 2, anything
    else with code 3 as an ``internal error``. Logging is configured (:func:`configure_logging`)
    before ``main`` runs. Tracebacks are shown only with ``debug`` (``--debug``) or
    ``WBC_DEBUG=1``.
    """
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") if debug is None else debug
    configure_logging()
    install_sigterm_handler()
    try:
        return int(main(*args) or 0)
    except KNOWN_ERRORS as error:
        if debug:
            _say(traceback.format_exc().rstrip())
        _say(f"error: {one_line(error)}")
        return USER_ERROR_EXIT
    except Terminated:
        logging.getLogger(__name__).debug("terminated by SIGTERM")
        _say("error: terminated (SIGTERM); temporary files were removed")
        return SIGTERM_EXIT
    except KeyboardInterrupt:
        _say("error: interrupted")
        return 128 + signal.SIGINT
    except Exception as error:  # noqa: BLE001 - whatever it is, the user sees one line
        if debug:
            _say(traceback.format_exc().rstrip())
        _say(f"internal error: {type(error).__name__}: {one_line(error)} (a bug: run with "
             "--debug or WBC_DEBUG=1 for the traceback, and report it)")
        return INTERNAL_ERROR_EXIT

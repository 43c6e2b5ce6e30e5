"""Progress bars and stage timings.

Bars appear only on an interactive terminal and never with ``--quiet``; stage
timings are logged at INFO, which ``-v`` turns on.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("lowbit")
T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def bars_enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def bar(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, disable=not bars_enabled(), leave=False, file=sys.stderr))


_steps = None     # the bar of the enclosing ``steps`` block, advanced by ``stage``


@contextlib.contextmanager
def steps(total: int, desc: str) -> Iterator[None]:
    """A bar over a fixed number of ``stage`` blocks (e.g. the compile pipeline)."""
    global _steps
    from tqdm.auto import tqdm

    outer = _steps
    _steps = tqdm(total=total, desc=desc, disable=not bars_enabled(), leave=False, file=sys.stderr,
                  bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")
    try:
        yield
    finally:
        _steps.close()
        _steps = outer


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    if _steps is not None:
        _steps.set_postfix_str(name)
    t0 = time.perf_counter()
    yield
    log.info("%-22s %8.2f s", name, time.perf_counter() - t0)
    if _steps is not None:
        _steps.update(1)


@contextlib.contextmanager
def native_stderr_to_debug() -> Iterator[None]:
    """Route C++ log lines written straight to fd 2 into the debug log.

    TVM's LOG(WARNING) prints, e.g., one "Fast mode segfaults ..." line per
    Gather and one "Scope Loaded" line per loaded function; a user needs none
    of them, and ``-vv`` shows them.  Python's own stderr (log records,
    progress bars) keeps going to the real stderr meanwhile.
    """
    import os
    import tempfile

    sys.stderr.flush()
    old_err = sys.stderr
    try:
        python_on_fd2 = old_err.fileno() == 2
    except (AttributeError, OSError, ValueError):     # already captured (pytest, notebooks)
        python_on_fd2 = False
    saved = os.dup(2)
    py_err = os.fdopen(os.dup(saved), "w", buffering=1) if python_on_fd2 else old_err
    handlers = [h for h in logging.getLogger().handlers + log.handlers
                if python_on_fd2 and isinstance(h, logging.StreamHandler) and h.stream is old_err]
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        sys.stderr = py_err
        for h in handlers:
            h.setStream(py_err)
        try:
            yield
        finally:
            for h in handlers:
                h.setStream(old_err)
            sys.stderr = old_err
            if py_err is not old_err:
                py_err.close()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                log.debug("tvm: %s", line)

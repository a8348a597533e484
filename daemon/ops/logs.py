"""The daemon's log lines: journald-aware format on stderr, and a rate limit for bursts.

Format. Under systemd, stderr is a stream to journald, and systemd says so by setting
JOURNAL_STREAM=<device>:<inode> of that stream (systemd.exec(5)). When it matches our stderr, each
line starts with its syslog priority, ``<4>inferd.health: device cpu#0: healthy -> out: ...``
(sd-daemon(3) prefixes), so ``journalctl -p warning`` works, and carries no timestamp (the journal
adds its own). Anywhere else (a terminal, a test's log file, a stderr redirected by the unit) lines
keep the plain ``time LEVEL logger: message`` format.

Rate limit. Events a client can cause in a loop (refused hellos, malformed frames, late results)
must not turn into one line each: :class:`RateLimitedLog` lets one line per ``interval`` through
and folds the rest into a count that the next line that passes reports::

    _refusals = RateLimitedLog(log, interval=10.0)
    ...
    _refusals.info("hello from pid %d refused: %s", pid, reason)
    # -> "hello from pid 812 refused: ... (37 more like this since the previous one, not logged)"

One limiter per kind of event (a module-level one is fine: the loop thread is its only user, and
the counter tolerates a rare race between threads by at worst misreporting a count).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

# sd-daemon(3) / syslog(3) priorities
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """Syslog priority of a logging level (levels between the named ones round toward debug)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; every line of a multi-line record (a traceback) gets the prefix,
    since journald makes each line its own entry."""

    def __init__(self):
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal(environ=os.environ, stream=None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd named in JOURNAL_STREAM."""
    expected = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = expected.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):     # closed, or not a real file (pytest capture)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str, stream=None, environ=os.environ) -> bool:
    """Send the daemon's logging to ``stream`` (stderr) at ``level`` (a name in any case). Returns
    whether the journal format was chosen. Like logging.basicConfig, does nothing when the root
    logger has handlers already (an embedding program, or pytest, configured logging)."""
    stream = stream or sys.stderr
    journal = stderr_is_journal(environ, stream)
    root = logging.getLogger()
    if root.handlers:
        return False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return journal


class RateLimitedLog:
    """At most one line per ``interval`` seconds for one kind of event; see the module docstring.
    Lines below the logger's level neither print nor count."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._next = -float("inf")         # when the next line may pass
        self.suppressed = 0                # lines held back since the last one that passed

    def log(self, level: int, msg: str, *args) -> bool:
        """Log unless a line of this kind passed less than ``interval`` ago; returns whether it did."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} more like this since the previous one, not logged)"
        self.suppressed = 0
        self._next = now + self.interval
        self.logger.log(level, msg, *args)
        return True

    def info(self, msg: str, *args) -> bool:
        return self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args) -> bool:
        return self.log(logging.ERROR, msg, *args)

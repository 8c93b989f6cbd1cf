"""A pytest plugin for runs that a time limit may cut: each test's result streamed to a file as it finishes, and a
per-test time limit.

Switched on by environment variables (``tests/conftest.py`` registers it; elsewhere ``-p stream_report`` with
``tests/`` on ``PYTHONPATH``)::

    DYNCONV_TEST_STREAM=PATH        append a line per test to PATH as it starts and as it ends (outcome, seconds,
                                    and the failure text, indented), each flushed at once
    DYNCONV_TEST_TIMEOUT=SECONDS    a test still running after SECONDS fails with TimeLimitExceeded (SIGALRM,
                                    in the test's call phase); the run goes on with the next test
    DYNCONV_TEST_TIMEOUT_GRACE=S    if a test has not returned S seconds (default 30) after its limit (stuck in
                                    C code, where a signal waits until control comes back to Python: a hung
                                    kernel, a synchronisation), the stack of every thread is written to PATH
                                    (else to stderr) and the process exits, so a script running it goes on

pytest itself reports failures only at the end of the session: a run killed by a time limit lost every detail.
With the stream the file holds every result up to the cut, and the last ``start`` line names the test that was
running. Nothing here imports torch: the plugin costs nothing when it is off.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

ENV_STREAM = "DYNCONV_TEST_STREAM"
ENV_TIMEOUT = "DYNCONV_TEST_TIMEOUT"
ENV_GRACE = "DYNCONV_TEST_TIMEOUT_GRACE"
PLUGIN_NAME = "dynconv-stream-report"


class TimeLimitExceeded(BaseException):
    """Raised inside a test that ran past ``DYNCONV_TEST_TIMEOUT`` seconds. A BaseException, so code under test
    that turns an Exception into a result (a benchmark's row saying why a candidate failed) does not swallow it;
    pytest still reports it as the test's failure."""


def _seconds(name: str, default: float | None) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise pytest.UsageError(f"{name}: expected a number of seconds > 0, got {text!r}")
    return value


class StreamReport:
    def __init__(self, path: str | None, timeout: float | None, grace: float):
        # One write() per result on an O_APPEND descriptor: several pytest processes can share the file (the GPU
        # check runs three) without their lines mixing.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None
        self.timeout, self.grace = timeout, grace
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()

    def _write(self, text: str) -> None:
        if self.fd is not None:
            os.write(self.fd, text.encode())

    def pytest_sessionstart(self, session) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        limit = f"{self.timeout:g} s per test" if self.timeout else "none"
        self._write(f"# pytest session {now}, pid {os.getpid()}, time limit: {limit}\n")

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.counts["error"] += 1
            self._write(f"ERROR   {report.nodeid or '.'} (collection)\n{_indent(report.longreprtext)}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._write(f"start   {item.nodeid}\n")
        if self.timeout:
            # The last resort for a test that no signal reaches: the stacks, then exit (status 1).
            out = self.fd if self.fd is not None else sys.stderr
            faulthandler.dump_traceback_later(self.timeout + self.grace, exit=True, file=out)
        try:
            yield
        finally:
            if self.timeout:
                faulthandler.cancel_dump_traceback_later()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        if not self.timeout:
            yield
            return
        limit = self.timeout

        def on_alarm(signum, frame):
            raise TimeLimitExceeded(f"{item.nodeid} ran past its time limit of {limit:g} s ({ENV_TIMEOUT})")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome = "XFAIL" if report.skipped else "XPASS"
            else:
                outcome = report.outcome.upper()
        elif report.failed:  # setup or teardown
            outcome = "ERROR"
        elif report.skipped:  # skipped in setup (a mark, a fixture)
            outcome = "SKIPPED"
        else:
            return
        self.counts[outcome.lower()] += 1
        phase = "" if report.when == "call" else f" ({report.when})"
        line = f"{outcome:7} {report.nodeid}{phase} {report.duration:.2f}s"
        if outcome in ("SKIPPED", "XFAIL") and isinstance(report.longrepr, tuple):
            line += f" {report.longrepr[2]}"  # (file, line, reason)
        self._write(line + "\n" + (_indent(report.longreprtext) if outcome in ("FAILED", "ERROR") else ""))

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "no tests"
        took = time.monotonic() - self.started
        self._write(f"# finished: {counts} in {took:.1f} s, exit status {int(exitstatus)}, pid {os.getpid()}\n")

    def pytest_unconfigure(self, config) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _indent(text: str) -> str:
    return "".join("    " + line + "\n" for line in text.splitlines())


def register(config) -> None:
    """Register the plugin when ``DYNCONV_TEST_STREAM`` or ``DYNCONV_TEST_TIMEOUT`` is set (once)."""
    if config.pluginmanager.has_plugin(PLUGIN_NAME):
        return
    path = os.environ.get(ENV_STREAM, "").strip() or None
    timeout = _seconds(ENV_TIMEOUT, None)
    if path is None and timeout is None:
        return
    config.pluginmanager.register(StreamReport(path, timeout, _seconds(ENV_GRACE, 30.0)), PLUGIN_NAME)


def pytest_configure(config) -> None:  # loaded with -p stream_report
    register(config)

"""The streaming pytest report (tests/stream_report.py), on tiny test files run by pytest in a subprocess."""

import os
import subprocess
import sys
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

STREAMED = """
import os
import time

import pytest


def test_passes():
    pass


def test_fails():
    assert 1 + 1 == 3, "arithmetic is broken"


@pytest.mark.skip(reason="not today")
def test_skipped():
    pass


@pytest.fixture
def broken_fixture():
    raise RuntimeError("the fixture broke")


def test_setup_error(broken_fixture):
    pass


def test_waits_for_the_parent():
    # the parent reads the stream while this test runs, then lets it end
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists(os.environ["GO"])
"""

TIMED = """
import signal
import time


def test_sleeps_past_the_limit():
    try:
        time.sleep(30)
    except Exception:  # code that handles its errors does not swallow the time limit
        pass


def test_after_the_limit_still_runs():
    pass


def test_deaf_to_the_alarm():
    # the alarm cannot reach it (as a test stuck in C code): the hard limit writes the stacks and ends the run
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(30)


def test_never_reached():
    pass
"""


def _pytest(tmp_path, source, **env):
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text(source)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DYNCONV_TEST_")}
    environ.update(env, PYTHONPATH=TESTS_DIR + os.pathsep + environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "stream_report", "-p", "no:cacheprovider", str(test_file)]
    return subprocess.Popen(cmd, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, text, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert proc.poll() is None, f"pytest ended early:\n{proc.stdout.read()}"
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in the stream after {seconds} s:\n{content}")


def test_each_result_is_in_the_file_while_the_run_goes_on(tmp_path):
    stream, go = tmp_path / "stream.txt", tmp_path / "go"
    proc = _pytest(tmp_path, STREAMED, DYNCONV_TEST_STREAM=str(stream), GO=str(go))
    try:
        during = _wait_for(stream, "start   test_tiny.py::test_waits_for_the_parent", proc)
    finally:
        go.touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    lines = during.splitlines()
    assert lines[0].startswith("# pytest session ") and "time limit: none" in lines[0]
    results = [line.split()[:2] for line in lines if not line.startswith(("#", "start", "    "))]
    assert results == [
        ["PASSED", "test_tiny.py::test_passes"],
        ["FAILED", "test_tiny.py::test_fails"],
        ["SKIPPED", "test_tiny.py::test_skipped"],
        ["ERROR", "test_tiny.py::test_setup_error"],
    ]
    # the failure text follows its line, indented: the assertion message and the failing line
    failed = during.split("FAILED  test_tiny.py::test_fails", 1)[1].split("start ", 1)[0]
    assert "AssertionError: arithmetic is broken" in failed and "    >       assert 1 + 1 == 3" in failed
    assert "(setup)" in during and "RuntimeError: the fixture broke" in during
    assert "not today" in during  # the skip reason
    final = stream.read_text()
    assert final.startswith(during)
    assert "PASSED  test_tiny.py::test_waits_for_the_parent" in final
    assert final.splitlines()[-1].startswith("# finished: 1 error, 1 failed, 2 passed, 1 skipped in ")


def test_time_limit_fails_the_test_and_the_run_goes_on_then_a_deaf_test_ends_the_run(tmp_path):
    stream = tmp_path / "stream.txt"
    env = dict(DYNCONV_TEST_STREAM=str(stream), DYNCONV_TEST_TIMEOUT="1", DYNCONV_TEST_TIMEOUT_GRACE="1.5")
    t0 = time.monotonic()
    out, _ = _pytest(tmp_path, TIMED, **env).communicate(timeout=60)
    assert time.monotonic() - t0 < 25  # neither 30 s sleep ran out
    text = stream.read_text()
    assert "time limit: 1 s per test" in text.splitlines()[0]
    assert "FAILED  test_tiny.py::test_sleeps_past_the_limit" in text
    assert "TimeLimitExceeded: test_tiny.py::test_sleeps_past_the_limit ran past its time limit of 1 s" in text
    assert "PASSED  test_tiny.py::test_after_the_limit_still_runs" in text
    # the deaf one: its start line, then the stacks from faulthandler (the test's frame among them), and nothing more
    tail = text.split("start   test_tiny.py::test_deaf_to_the_alarm\n", 1)[1]
    assert tail.startswith("Timeout (0:00:02") and "in test_deaf_to_the_alarm" in tail
    assert "test_never_reached" not in text


@pytest.mark.parametrize("value", ["soon", "0"])
def test_bad_time_limit_is_a_usage_error(tmp_path, value):
    proc = _pytest(tmp_path, "def test_x():\n    pass\n", DYNCONV_TEST_TIMEOUT=value)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 4 and f"DYNCONV_TEST_TIMEOUT: expected a number of seconds > 0, got '{value}'" in out

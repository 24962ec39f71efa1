"""The test run's own hang watchdog (tests/conftest.py): a test that pytest-timeout
cannot interrupt ends the run with every thread's stack, instead of holding CI to
its limit with nothing printed; one it can interrupt still just fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import ROOT

SCRATCH_TESTS = '''
import signal, time

def test_interruptible_hang_fails_alone():
    time.sleep(60)  # pytest-timeout's SIGALRM ends this one

def test_after_it_runs():
    pass

def test_hang_the_alarm_cannot_reach():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as a C call that never returns
    time.sleep(60)

def test_never_reached():
    pass
'''


def test_a_hang_past_the_timeout_ends_the_run_with_stacks(tmp_path):
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMTRITON_TEST_HANG_MARGIN_S": "3"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-v", "--timeout=2", "-c", os.devnull,
         "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_scratch.py")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert "test_interruptible_hang_fails_alone FAILED" in out, out
    assert "test_after_it_runs PASSED" in out, out
    # The watchdog: a faulthandler dump naming where the test hung, then exit.
    assert "Timeout (" in proc.stderr and "in test_hang_the_alarm_cannot_reach" in proc.stderr, out
    assert "test_never_reached" not in out, out
    assert proc.returncode != 0
    assert took < 60, took

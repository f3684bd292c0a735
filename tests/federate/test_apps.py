"""The Flower apps end with the moekit federate that started them, also when it died as a
zombie (killed with -9 where no init reaps orphans): Flower's own parent monitor, a bare pid
check, kept a ServerApp alive after the suite (it also ignored SIGTERM)."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr")

APP = "import time, moekit.federate.apps; time.sleep(120)"


def _app_watching(pid: int) -> subprocess.Popen:
    env = {**os.environ, "MOEKIT_FEDERATION_PID": str(pid)}
    return subprocess.Popen([sys.executable, "-c", APP], env=env)


def _exits_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_an_app_process_ends_when_its_launcher_is_a_zombie_or_gone():
    launcher = subprocess.Popen(["sleep", "120"])
    app = _app_watching(launcher.pid)
    try:
        assert not _exits_within(app, 8.0)          # imported, watching a live launcher: stays
        launcher.send_signal(signal.SIGKILL)         # not reaped: a zombie
        time.sleep(0.2)
        with open(f"/proc/{launcher.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
        assert _exits_within(app, 10.0) and app.returncode == 1
    finally:
        for p in (app, launcher):
            p.kill()
            p.wait()
    gone = _app_watching(launcher.pid)             # reaped: no such process at all
    try:
        assert _exits_within(gone, 30.0) and gone.returncode == 1
    finally:
        gone.kill()
        gone.wait()

"""The command line against closed pipes and bad data names: one line or silence, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import data as data_cmd
from moekit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, unbuffered", [(["data", "list"], False), (["data", "list"], True),
                                              (["--help"], False)])
def test_closed_stdout_pipe_ends_quietly_with_141(argv, unbuffered):
    """``moekit data list | head -1``: the reader is gone before moekit writes (closed here before
    it starts, so the test does not race). Buffered, the error would come at the exit flush;
    unbuffered (PYTHONUNBUFFERED, as in CI), inside print."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "moekit", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stderr == "" and proc.returncode == 141


def test_a_broken_pipe_elsewhere_is_not_hidden(monkeypatch, capfd):
    """Only a closed stdout ends quietly: a BrokenPipeError from another pipe keeps its traceback."""
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a worker's pipe)")
    monkeypatch.setattr(data_cmd, "run_list", broken)
    with pytest.raises(BrokenPipeError, match="worker"):
        main(["data", "list"])


def test_data_get_of_a_name_not_in_the_catalog_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ls").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(200))
    for name in ["wikipedia", "no/such/dir", "nosuch.txt", "", "ls"]:
        assert main(["data", "get", name]) == 2, name
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("moekit data: error: ") and err.count("\n") == 1, (name, err)

"""The federation's processes on this machine, on Flower's deployment engine.

One SuperLink (the server's side: it starts the ServerApp for a run), one SuperNode per
client (each starts a ClientApp process per message, its client named by ``--node-config``)
and ``flwr run`` submitting the app, all over gRPC on localhost, insecure (one machine).
Every process is a child of ``moekit federate`` and dies with it (PR_SET_PDEATHSIG), its
log in OUT/flower/; the ServerApp and ClientApp processes Flower starts in turn end when
``moekit federate`` is gone (a watch in moekit.federate.apps). A client process that dies
is started again (up to ``RESTARTS`` times); the round it was in goes on with the others
(``--min-clients``).
A second ``moekit federate`` on the same OUT is refused while the first holds its lock.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moekit.federate.server import ERROR_FILE, last_round, summary_line
from moekit.federate.spec import FederationSpec

log = logging.getLogger("moekit.federate")
RESTARTS = 3                    # restarts of one client's SuperNode
APP_NAME = "moekit-federation"


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}; moekit federate needs "
                                "Flower: pip install 'moekit[federate]' (flwr)")
    return str(path)


def client_env(env: dict[str, str], client: int, device: str, cuda_count: int) -> dict[str, str]:
    """The environment of client ``client``'s processes: ``env`` and, when the clients train on
    CUDA (``train.device`` "cuda", or "auto" with ``cuda_count`` > 0 visible GPUs), its own GPU:
    ``CUDA_VISIBLE_DEVICES`` the (client % cuda_count)-th of the GPUs ``env`` shows (its own
    CUDA_VISIBLE_DEVICES list where it has one), so clients spread over the GPUs instead of all
    training on the first. A pure function (tests pass fake counts).

    Example:
        >>> client_env({}, 3, "auto", 2)["CUDA_VISIBLE_DEVICES"]
        '1'
    """
    if device not in ("cuda", "auto") or cuda_count < 1:
        return dict(env)
    shown = env.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in shown.split(",")][:cuda_count] if shown else [str(j) for j in range(cuda_count)]
    return {**env, "CUDA_VISIBLE_DEVICES": ids[client % len(ids)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when moekit federate dies (even by kill -9)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG


@contextmanager
def locked(out: Path):
    """Hold OUT/flower/lock for the federation's lifetime (released by the kernel on any exit)."""
    path = Path(out) / "flower" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise ValueError(f"{str(out)!r} is in use by another moekit federate (pid {pid}); "
                             "wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


class Processes:
    """The SuperLink, the SuperNodes and ``flwr run``: started, watched, stopped."""

    def __init__(self, out: Path, spec: FederationSpec):
        self.out, self.spec = Path(out).resolve(), spec
        self.dir = self.out / "flower"
        # Flower starts its own helpers (flower-superexec, flwr-clientapp) by name: this Python's first
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        # MOEKIT_FEDERATION_PID: the Flower apps end when this process is gone (moekit.federate.apps)
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.dir / "home"), "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads),
                    "MOEKIT_FEDERATION_PID": str(os.getpid())}
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = [0] * spec.clients
        self.link_port = free_port()

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logf = open(self.dir / f"{name}.log", "a")
        logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        logf.flush()
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env or self.env,
                                cwd=str(self.dir), preexec_fn=_die_with_parent)
        logf.close()
        self.procs[name] = proc
        return proc

    def write_app(self) -> Path:
        """The Flower app directory (its components are moekit's), FLWR_HOME and the node configs."""
        app = self.dir / "app"
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(
            f"[project]\nname = \"{APP_NAME}\"\nversion = \"1.0.0\"\ndependencies = []\n\n"
            "[tool.flwr.app]\npublisher = \"moekit\"\n\n"
            "[tool.flwr.app.components]\nserverapp = \"moekit.federate.apps:server_app\"\n"
            "clientapp = \"moekit.federate.apps:client_app\"\n\n"
            f"[tool.flwr.app.config]\nout = {json.dumps(str(self.out))}\n")
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            "[superlink]\ndefault = \"local\"\n\n[superlink.local]\n"
            f"address = \"127.0.0.1:{self.link_port}\"\ninsecure = true\n")
        for i in range(self.spec.clients):
            (self.dir / f"client{i}.toml").write_text(f"out = {json.dumps(str(self.out))}\nclient = {i}\n")
        return app

    def start_link(self) -> None:
        self._start("superlink", [_bin("flower-superlink"), "--insecure", "--port", str(self.link_port)])

    def wait_for_link(self, timeout: float = 120.0) -> None:
        """Until the SuperLink accepts connections (flwr run does not retry)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.procs["superlink"].poll() is not None:
                code = self.procs["superlink"].returncode
                raise RuntimeError(f"the Flower SuperLink exited (code {code}); see "
                                   f"{self.dir / 'superlink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.link_port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Flower SuperLink did not listen on port {self.link_port} within "
                                       f"{timeout:.0f} s; see {self.dir / 'superlink.log'}") from None
                time.sleep(0.3)

    def start_client(self, i: int) -> None:
        self._start(f"client{i}", [_bin("flower-supernode"), "--insecure", "--superlink",
                                   f"127.0.0.1:{self.link_port}", "--port", str(free_port()),
                                   "--node-config", str(self.dir / f"client{i}.toml")],
                    client_env(self.env, i, self.spec.recipe.get("train", {}).get("device", "auto"),
                               torch.cuda.device_count() if torch.cuda.is_available() else 0))

    def start_run(self, app: Path) -> subprocess.Popen:
        return self._start("run", [_bin("flwr"), "run", str(app), "local", "--stream"])

    def watch(self) -> None:
        """Restart a client whose process died (up to RESTARTS times); the link's death is fatal."""
        link = self.procs["superlink"]
        if link.poll() is not None:
            raise RuntimeError(f"the Flower SuperLink exited (code {link.returncode}); see "
                               f"{self.dir / 'superlink.log'}")
        for i in range(self.spec.clients):
            proc = self.procs[f"client{i}"]
            if proc.poll() is None or self.restarts[i] >= RESTARTS:
                continue
            self.restarts[i] += 1
            print(f"client {i}'s process exited (code {proc.returncode}); starting it again "
                  f"({self.restarts[i]}/{RESTARTS}); the round goes on with the others", flush=True)
            self.start_client(i)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _progress(out: Path, last: int, rounds: int) -> int:
    """Print the rounds after round ``last`` that metrics.jsonl holds; returns the last printed."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return last
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break                            # a line being written: read it next time
        if row["step"] > last:
            print(f"round {row['step']}/{rounds}: {summary_line(row)}", flush=True)
            last = row["step"]
    return last


def run_federation(out: Path) -> int:
    """Run (or go on with) the federation in ``out`` to its last round; returns the last kept round."""
    out = Path(out)
    spec = FederationSpec.load(out)
    with locked(out):
        (out / "flower" / ERROR_FILE).unlink(missing_ok=True)
        start = last_round(out)
        if start >= spec.rounds:
            return start
        procs = Processes(out, spec)
        app = procs.write_app()
        seen, run = start, None
        try:
            procs.start_link()
            procs.wait_for_link()
            for i in range(spec.clients):
                procs.start_client(i)
            run = procs.start_run(app)
            while run.poll() is None:
                procs.watch()
                seen = _progress(out, seen, spec.rounds)
                time.sleep(1.0)
            _progress(out, seen, spec.rounds)
        finally:
            procs.stop()
    done = last_round(out)
    if done < spec.rounds:
        err = out / "flower" / ERROR_FILE
        code = run.returncode if run is not None else "?"
        why = err.read_text().strip() if err.exists() else f"flwr run exited with code {code}"
        raise RuntimeError(f"the federation stopped after round {done} of {spec.rounds}: {why} (logs in "
                           f"{out / 'flower'}); continue it with moekit federate --resume {out}")
    return done

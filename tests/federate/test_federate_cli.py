"""moekit federate for real: Flower's SuperLink and one SuperNode per client as processes on
this machine, tiny models on real parlspeech speeches; a client killed mid-federation and the
launcher itself killed with -9 and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.cli.main import main as cli

pytest.importorskip("flwr")

TINY = ["data.vocab_size=512", "data.seq_len=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.d_ff=64", "model.moe.d_ff=32", "model.moe.num_experts=4", "train.batch_size=4",
        "train.max_steps=3", "train.eval_batches=2"]


def args(corpus, out, *extra) -> list[str]:
    sets = [a for s in [f'data.corpus="{corpus}"', *TINY] for a in ("--set", s)]
    return ["federate", *sets, "--out", str(out), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--clients", "5", "--rounds", "2"],
     "--clients 5: .* splits into 4 shards by tag (de, en, es, nl), one per client; use --clients 4"),
    (["--rounds", "0"], "--rounds 0: a federation needs at least one round"),
    (["--rounds", "2", "--strategy", "fedsgd"], "--strategy 'fedsgd': no such strategy; use one of fedavg, "
                                                 "local-experts, routing"),
    (["--rounds", "2", "--shard", "EMPTY", "--shard", "CORPUS:en"],
     "client 0's shard .*empty.txt.*holds no text"),
    (["--rounds", "2", "--shard", "CORPUS:fr"], "client 0's shard .* has no documents tagged 'fr'"),
])
def test_bad_input_is_one_line_and_writes_nothing(parl_subset, tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("")
    extra = [str(tmp_path / "empty.txt") if a == "EMPTY" else a.replace("CORPUS", str(parl_subset))
             for a in extra]
    assert cli(args(parl_subset, tmp_path / "fed", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    import re
    assert re.search(message.replace("(", r"\(").replace(")", r"\)"), err), err
    assert not (tmp_path / "fed").exists()


@pytest.fixture
def launch():
    """Start ``moekit ARGV`` in the background; whatever is left is stopped after the test."""
    started = []

    def start(argv: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "moekit", *argv], stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, env=env)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()        # its Flower processes go with it
            proc.wait(timeout=60)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the federation exited early: {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def processes_of(out: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout.splitlines()
    return [p for p in ps if str(out) in p and ("flower" in p or "flwr" in p)]


def test_a_killed_client_then_a_killed_launcher_lose_nothing(parl_subset, tmp_path, launch, capsys):
    """local-experts, 3 rounds. Client 1's SuperNode is killed with -9 as round 2 starts: round
    2 finishes with client 0 alone and client 1 is started again. The launcher itself is then
    killed with -9 after round 2: its Flower processes go with it, and --resume runs round 3
    once. Experts never leave their client."""
    out = tmp_path / "fed"
    shards = ["--shard", f"{parl_subset}:de", "--shard", f"{parl_subset}:en"]
    proc = launch(args(parl_subset, out, "--rounds", "3", "--strategy", "local-experts", *shards),
                  tmp_path / "log")
    wait_for(out / "rounds" / "round-0001" / "round.json", proc)
    victim = [p for p in processes_of(out) if "flower-supernode" in p and "client1.toml" in p]
    assert len(victim) == 1
    subprocess.run(["pkill", "-9", "-f", f"supernode.*{out}/flower/client1.toml"], check=True)
    wait_for(out / "rounds" / "round-0002" / "round.json", proc)
    while len(rows(out)) < 2:           # kept, then logged
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "client 1's process exited" in (tmp_path / "log").read_text()
    deadline = time.monotonic() + 30
    while processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_of(out), processes_of(out)
    assert [r["step"] for r in rows(out)] == [1, 2]
    again = launch(["federate", "--resume", str(out)], tmp_path / "log2")
    assert again.wait(timeout=300) == 0, (tmp_path / "log2").read_text()
    r1, r2, r3 = rows(out)
    assert (r2["clients/trained"], r2["clients/failed"]) == (1, 1) and "client1/train_loss" not in r2
    assert r3["clients/trained"] == 2 and r3["client1/step"] == 6 and r3["client0/step"] == 9
    for key in ("client0/val_loss", "client1/val_loss_on_client0", "routing/layer0/top1_agreement",
                "experts/layer0/same_index_cos", "bytes/up", "bytes/down"):
        assert r1[key] == r1[key] and r3[key] == r3[key], key          # present, not NaN
    assert r3["bytes/up"] < r1["bytes/down"] / 2          # experts stay home: shared tensors only
    assert cli(["federate", "--resume", str(out)]) == 0     # finished: nothing to do
    before = (out / "federate.json").read_bytes()
    assert cli(args(parl_subset, out, "--rounds", "3")) == 2   # --out at it again: says how to continue
    assert f"--out {str(out)!r} already holds a federation (federate.json); continue it with --resume " \
           in capsys.readouterr().err
    assert (out / "federate.json").read_bytes() == before
    from moekit.store.run_dir import load_run
    server = load_run(out / "rounds" / "round-0003")[0].state_dict()
    start = load_run(out / "rounds" / "round-0000")[0].state_dict()
    c0, c1 = (load_run(out / "clients" / f"client{i}")[0].state_dict() for i in (0, 1))
    key = "blocks.0.ffn.experts.w_up_EDF"
    assert (server[key] == start[key]).all()              # the server never saw an expert
    assert not (c0[key] == c1[key]).all() and not (c0[key] == start[key]).all()
    router = "blocks.0.ffn.router.weight_ED"              # shared: the clients start round 4 from it
    assert not (server[router] == start[router]).all()
    assert cli(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "model of client1" in page and "data of client0" in page and "same_index_cos" in page
    assert page.count("<tr><td>") == 3                      # one participation row per round

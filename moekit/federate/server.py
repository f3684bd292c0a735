"""The server's rounds (inside Flower's ServerApp, moekit.federate.apps).

A round: send the model's shared tensors to every connected client (Flower's FedAvg
samples them; a round needs ``spec.quorum`` replies), average the replies under the
strategy, send the result back for each client's evaluation on its own data, measure, and
keep the round: ``OUT/rounds/round-NNNN`` (an export directory, ``round.json`` written
last). A restarted server goes on after the last kept round.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from moekit.federate.client import evaluate_on, personalised_model
from moekit.federate.diagnostics import PROBE_PREFIX, federation_similarity
from moekit.federate.spec import ROUND_FILE, FederationSpec, last_round, round_dir
from moekit.federate.strategies import aggregate, on_wire, sent_keys
from moekit.store.run_dir import load_run, save_export, write_json
from moekit.store.source import Initial
from moekit.train.metrics import MetricsWriter
from moekit.train.run import load_initial

log = logging.getLogger("moekit.federate")
ERROR_FILE = "server-error.txt"
STARTUP_S = 300.0          # the first round waits this long for every client to connect


class FederationError(RuntimeError):
    """The federation cannot go on; the message says what is intact and how to resume."""


@dataclass
class RoundReplies:
    metrics: list[dict] = field(default_factory=list)       # each replying client's numbers
    probes: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    up_bytes: int = 0
    probe_bytes: int = 0


class MoEFedAvg(FedAvg):
    """Flower's FedAvg sampling and reply checks, moekit's averaging (moekit.federate.strategies)."""

    def __init__(self, spec: FederationSpec):
        q = spec.quorum
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=q, min_evaluate_nodes=q,
                         min_available_nodes=q)
        self.spec = spec
        self.replies = RoundReplies()

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        got = RoundReplies(failures=[_reason(m) for m in failed])
        states = []
        for msg in valid:
            arrays = msg.content["arrays"]
            tensors = arrays.to_torch_state_dict()
            probe = {k: v for k, v in tensors.items() if k.startswith(PROBE_PREFIX)}
            states.append({k: v for k, v in tensors.items() if k not in probe})
            got.probes.append(probe)
            got.metrics.append(dict(msg.content["metrics"]))
            got.probe_bytes += sum(v.numel() * v.element_size() for v in probe.values())
            got.up_bytes += arrays.count_bytes() + msg.content["metrics"].count_bytes()
        got.up_bytes -= got.probe_bytes
        self.replies = got
        if not states:
            return None, None
        weights = [m["num-examples"] for m in got.metrics]
        avg = aggregate(self.spec.strategy, states, weights, [_loads(m) for m in got.metrics])
        loss = sum(w * m["train_loss"] for w, m in zip(weights, got.metrics)) / sum(weights)
        return ArrayRecord(avg), MetricRecord({"train_loss": loss})


def _reason(msg: Message) -> str:
    return " ".join(str(msg.error.reason).split())[:200]


def wait_for_clients(grid: Grid, want: int, at_least: int, timeout: float) -> int:
    """Wait for ``want`` connected clients; after ``timeout`` s go on with ``at_least``."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < want:
        if time.monotonic() > deadline:
            if n >= at_least:
                log.warning("%d of %d clients connected after %.0f s; going on with them", n, want, timeout)
                return n
            raise FederationError(f"{n} of {want} clients connected within {timeout:.0f} s (a round needs "
                                  f"{at_least}); see the clients' logs in OUT/flower/")
        time.sleep(0.5)
    return n


def serve(grid: Grid, out: Path) -> None:
    """Every round from the last kept one to ``spec.rounds``; a failure is written to
    OUT/flower/server-error.txt (the launcher prints it) and raised."""
    out = Path(out)
    try:
        spec = FederationSpec.load(out)
        start = last_round(out)
        model, tok, cfg = load_run(round_dir(out, start))
        strategy = MoEFedAvg(spec)
        writer = MetricsWriter(out, purge_after=start)
        try:
            _log_kept_rounds(out, start, writer)
            wait_for_clients(grid, spec.clients, spec.quorum, min(STARTUP_S, spec.round_timeout))
            for r in range(start + 1, spec.rounds + 1):
                row = run_round(grid, strategy, spec, model, tok, out, r)
                keep_round(out, r, model, tok, cfg, row)
                writer.log(r, row)
                log.info("round %d/%d: %s", r, spec.rounds, summary_line(row))
        finally:
            writer.close()
    except BaseException as err:
        (out / "flower").mkdir(parents=True, exist_ok=True)
        (out / "flower" / ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n")
        raise


def _log_kept_rounds(out: Path, start: int, writer: MetricsWriter) -> None:
    """The rows of kept rounds that metrics.jsonl lacks (a server stopped between keeping a
    round and logging it), from their round.json."""
    path = out / "metrics.jsonl"
    logged = {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()}
    for r in range(1, start + 1):
        if r not in logged and (round_dir(out, r) / ROUND_FILE).exists():
            writer.log(r, json.loads((round_dir(out, r) / ROUND_FILE).read_text())["metrics"])


def run_round(grid: Grid, strategy: MoEFedAvg, spec: FederationSpec, model, tok, out: Path, r: int) -> dict:
    """Train, average, evaluate and measure round ``r``; ``model`` becomes the round's average."""
    t0 = time.time()
    tied = model.cfg.tie_embeddings
    own = model.state_dict()
    # round 1 starts every client from the same experts, later rounds leave them local
    keys = sent_keys(own, "fedavg" if r == 1 else spec.strategy, tied)
    arrays = ArrayRecord(on_wire(own, keys))
    config = ConfigRecord({"tokenizer": tok.to_str()})
    msgs = list(strategy.configure_train(r, arrays, config, grid))
    down = (arrays.count_bytes() + config.count_bytes()) * len(msgs)
    agg, _ = strategy.aggregate_train(r, grid.send_and_receive(msgs, timeout=spec.round_timeout))
    got = strategy.replies
    if agg is None or len(got.metrics) < spec.quorum:
        raise FederationError(f"round {r}: {len(got.metrics)} of {len(msgs)} clients answered (a round needs "
                              f"{spec.quorum}, --min-clients)"
                              f"{'; ' + got.failures[0] if got.failures else ''}; round {r - 1}'s model is "
                              f"intact in {round_dir(out, r - 1)}: start the clients "
                              f"and continue with moekit federate --resume {out}")
    averaged = agg.to_torch_state_dict()
    load_initial(model, Initial(averaged, tok, partial=True))
    shared = ArrayRecord(on_wire(averaged, sent_keys(averaged, spec.strategy, tied)))
    emsgs = list(strategy.configure_evaluate(r, shared, ConfigRecord(), grid))
    down += shared.count_bytes() * len(emsgs)
    evals = {int(m.content["metrics"]["client"]): float(m.content["metrics"]["val_loss"])
             for m in grid.send_and_receive(emsgs, timeout=spec.round_timeout) if not m.has_error()}
    row = _round_row(got, evals)
    if spec.cross_eval:
        row.update(_cross_eval(spec, out, averaged, evals))
    row.update(federation_similarity(got.probes, [_loads(m) for m in got.metrics]))
    row.update({"bytes/down": float(down), "bytes/up": float(got.up_bytes),
                "bytes/probe_up": float(got.probe_bytes),
                "bytes/total": float(down + got.up_bytes + got.probe_bytes),
                "time/round_s": time.time() - t0})
    return row


def _loads(metrics: dict) -> dict:
    """A reply's {layer: tokens per expert} from its ``load.L`` metrics."""
    return {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("load.")}


def _round_row(got: RoundReplies, evals: dict[int, float]) -> dict:
    row: dict = {"clients/trained": float(len(got.metrics)), "clients/failed": float(len(got.failures)),
                 "clients/evaluated": float(len(evals))}
    for m in got.metrics:
        i = int(m["client"])
        row.update({f"client{i}/train_loss": m["train_loss"],
                    f"client{i}/local_val_loss": m["local_val_loss"],
                    f"client{i}/step": float(m["step"]), f"client{i}/tokens": float(m["num-examples"])})
    for i, loss in sorted(evals.items()):
        row[f"client{i}/val_loss"] = loss
    if evals:
        row["val_loss/mean"] = sum(evals.values()) / len(evals)
    return row


def _cross_eval(spec: FederationSpec, out: Path, averaged: dict, evals: dict[int, float]) -> dict:
    """client{i}/val_loss_on_client{j}: client i's model on client j's validation data.

    With fedavg and routing every client holds the averaged model, so it is client j's own
    evaluation. With local-experts client i's experts are its own: this measurement reads
    the clients' run directories on this machine (the operator's view, not part of the
    protocol: no client sends its experts or its data for it)."""
    row = {}
    for i in sorted(evals):
        model = None
        for j in sorted(evals):
            if i == j:
                continue
            if spec.strategy != "local-experts":
                row[f"client{i}/val_loss_on_client{j}"] = evals[j]
                continue
            if model is None:
                model, _ = personalised_model(out, i, averaged)
            row[f"client{i}/val_loss_on_client{j}"] = evaluate_on(model, out, j)
    return row


def keep_round(out: Path, r: int, model, tok, cfg, row: dict) -> None:
    """OUT/rounds/round-r: the averaged model as an export directory, then round.json."""
    path = round_dir(out, r)
    if path.exists():                   # what a server stopped mid-save left
        shutil.rmtree(path)
    save_export(model, tok, cfg, path)
    write_json(path / ROUND_FILE, {"round": r, "metrics": row})


def summary_line(row: dict) -> str:
    own = sorted(k for k in row if k.endswith("/val_loss") and k.startswith("client"))
    losses = " ".join(f"{k.split('/')[0]} {row[k]:.3f}" for k in own)
    mb = row["bytes/total"] / 2**20
    mean = row.get("val_loss/mean", math.nan)
    return (f"val_loss mean {mean:.3f} ({losses}); {int(row['clients/trained'])} trained, "
            f"{int(row['clients/failed'])} failed; {mb:.1f} MiB; {row['time/round_s']:.0f} s")

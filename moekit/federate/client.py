"""A client's side of a round, with no Flower in it (moekit.federate.apps wraps it).

Client I's state is its own moekit run directory, OUT/clients/clientI: round 1 makes it
(its shard tokenized with the federation's tokenizer), every later round resumes it. A
round loads the server's tensors over the checkpoint's model (optimizer moments, data
position and RNG stay the client's), trains ``train.max_steps`` local steps through the
engine's entry (``moekit.train.launch.launch``), and answers with the tensors the strategy
shares, the probe and its numbers. ``clients/clientI.rounds.json`` records each round
started and finished: a round asked again (the server restarted it, or the client died
after its checkpoint) is answered from the checkpoint without training twice. One ClientApp
at a time works in a client's directory (a lock file beside it).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.federate.diagnostics import probe
from moekit.federate.spec import FederationSpec, client_dir
from moekit.federate.strategies import on_wire, sent_keys
from moekit.store.checkpoint import Checkpoint, find_checkpoint
from moekit.store.run_dir import load_run, write_json
from moekit.store.source import Initial
from moekit.train.evaluate import evaluate
from moekit.train.launch import launch
from moekit.train.run import load_initial
from moekit.train.splits import open_split

ROUNDS = "rounds.json"


@dataclass
class Reply:
    arrays: dict[str, Tensor]        # the shared tensors (and the probe/ ones)
    metrics: dict                    # num-examples, train_loss, local_val_loss, client, load.L, ...


def _rounds_file(run_dir: Path) -> Path:
    """clients/clientI.rounds.json: beside the run directory (a new run's directory must be new)."""
    return run_dir.parent / f"{run_dir.name}.{ROUNDS}"


def _finished_rounds(run_dir: Path) -> dict:
    path = _rounds_file(run_dir)
    return json.loads(path.read_text()) if path.exists() else {}


@contextmanager
def _client_lock(out: Path, index: int):
    """One ClientApp at a time in a client's directory (a straggler's next message waits)."""
    path = Path(out) / "clients" / f"client{index}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def train_round(out: Path, index: int, server_round: int, state: dict[str, Tensor],
                tokenizer_json: str) -> Reply:
    """Client ``index``'s round ``server_round``, starting from the server's ``state``."""
    spec = FederationSpec.load(out)
    torch.set_num_threads(spec.threads)
    run_dir = client_dir(out, index)
    with _client_lock(out, index):
        done = _finished_rounds(run_dir)
        record = done.get(str(server_round))
        if record is None or "tokens" not in record:    # not trained, or cut short after its checkpoint
            record = (_record_from_checkpoint(spec, index, run_dir, record["start"]) if record else None) \
                or _train(spec, index, run_dir, server_round, state, tokenizer_json, done)
            done[str(server_round)] = record
            write_json(_rounds_file(run_dir), done)
        model, _, _ = load_run(run_dir)
    own = model.state_dict()
    arrays = on_wire(own, sent_keys(own, spec.strategy, model.cfg.tie_embeddings))
    arrays.update(probe(model, seed=spec.probe_seed))
    metrics = {"num-examples": int(record["tokens"]), "client": index, "step": int(record["step"]),
               "train_loss": float(record["train_loss"]), "local_val_loss": float(record["local_val_loss"]),
               **{f"load.{layer}": [float(c) for c in counts] for layer, counts in record["loads"].items()}}
    return Reply(arrays, metrics)


def _tokens(spec: FederationSpec, cfg) -> int:
    t = cfg.train
    return spec.local_steps * t.batch_size * t.grad_accum * cfg.data.seq_len


def _train(spec: FederationSpec, index: int, run_dir: Path, server_round: int, state, tokenizer_json: str,
           done: dict) -> dict:
    """Train the round's local steps; rounds.json says the round started (and from which step)
    before its checkpoint can exist."""
    from tokenizers import Tokenizer

    resume = find_checkpoint(run_dir) is not None
    if not resume and run_dir.exists():         # a first round cut short: nothing in it to keep
        shutil.rmtree(run_dir)
    step = Checkpoint(run_dir).meta["step"] if resume else 0
    cfg = spec.client_config(index)
    if step >= cfg.train.max_steps:
        raise ValueError(f"client {index} has trained all {cfg.train.max_steps} steps of the federation; "
                         f"round {server_round} is past --rounds {spec.rounds}")
    write_json(_rounds_file(run_dir), {**done, str(server_round): {"start": step}})
    initial = Initial(state, Tokenizer.from_str(tokenizer_json), partial=True)
    summary = launch(cfg, run_dir, resume=resume, progress=False, stop_at=step + spec.local_steps,
                     initial=initial)
    return {"start": step, "step": summary["steps"], "train_loss": summary["final_train_loss"],
            "local_val_loss": summary["final_val_loss"], "tokens": _tokens(spec, cfg),
            "loads": summary["routing_last_interval"]}


def _record_from_checkpoint(spec: FederationSpec, index: int, run_dir: Path, start: int) -> dict | None:
    """A round whose training finished (its checkpoint saved) but whose record was not written:
    its numbers from the run's own metrics.jsonl; None if the checkpoint is still the start."""
    step = Checkpoint(run_dir).meta["step"] if find_checkpoint(run_dir) is not None else start
    if step != start + spec.local_steps:
        return None
    row: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if r.get("step") == step:
            row.update(r)
    loads = {k.split("/")[1][len("layer"):]: v for k, v in row.items()
             if k.startswith("moe/layer") and k.endswith("/load")}
    return {"start": start, "step": step, "train_loss": row["loss/lm"], "local_val_loss": row["loss/val"],
            "tokens": _tokens(spec, spec.client_config(index)), "loads": loads}


def personalised_model(out: Path, index: int, state: dict[str, Tensor]):
    """(model, run config) client ``index`` holds after the server's ``state``: its checkpoint's
    model with the shared tensors loaded over it (under local-experts its experts stay its own)."""
    run_dir = client_dir(out, index)
    if find_checkpoint(run_dir) is None:
        raise ValueError(f"client {index} has no model yet (it has not finished a round); it is evaluated "
                         "after its first round")
    model, tok, cfg = load_run(run_dir)
    load_initial(model, Initial(state, tok, partial=True))
    return model, cfg


def evaluate_on(model, out: Path, index: int, batches: int | None = None) -> float:
    """``model``'s validation loss on client ``index``'s own validation split."""
    spec = FederationSpec.load(out)
    cfg = spec.client_config(index)
    val = open_split(cfg, client_dir(out, index), "val")
    return evaluate(model, val, cfg.train.batch_size, torch.device("cpu"),
                    batches if batches is not None else cfg.train.eval_batches)


def evaluate_round(out: Path, index: int, state: dict[str, Tensor]) -> dict:
    """Client ``index``'s evaluation of the round's model (its personalised one) on its own data."""
    spec = FederationSpec.load(out)
    torch.set_num_threads(spec.threads)
    with _client_lock(out, index):
        model, _ = personalised_model(out, index, state)
    return {"num-examples": 1, "client": index, "val_loss": evaluate_on(model, out, index)}

"""The Flower apps: ``server_app`` (the rounds, moekit.federate.server) and ``client_app``
(a client's train and evaluate, moekit.federate.client). ``moekit federate`` points a Flower
app directory at these two objects; a SuperNode's ``--node-config`` names its client
(``out``, ``client``) and the ServerApp's run config its federation (``out``)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()
LAUNCHER_ENV = "MOEKIT_FEDERATION_PID"     # set by moekit.federate.launch for every Flower process


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited: no such process, or a zombie (dead, not yet reaped; a
    parent killed with -9 can stay one where no init reaps orphans, which is why Flower's own
    parent monitor, a bare pid check, kept a ServerApp alive after its launcher)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:                       # no /proc: the pid check alone
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True


def watch_launcher(pid: int, every: float = 0.5) -> threading.Thread:
    """End this process (at once, whatever it is doing) when ``moekit federate`` (``pid``) is gone."""
    def watch():
        while not _gone(pid):
            time.sleep(every)
        os._exit(1)
    thread = threading.Thread(target=watch, name="moekit-launcher-watch", daemon=True)
    thread.start()
    return thread


if os.environ.get(LAUNCHER_ENV, "").isdigit():   # inside a ServerApp or ClientApp process it started
    watch_launcher(int(os.environ[LAUNCHER_ENV]))


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    from moekit.federate.server import serve
    serve(grid, Path(str(context.run_config["out"])))


def _client(context: Context) -> tuple[Path, int]:
    return Path(str(context.node_config["out"])), int(context.node_config["client"])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from moekit.federate.client import train_round
    out, index = _client(context)
    config = msg.content["config"]
    reply = train_round(out, index, int(config["server-round"]), msg.content["arrays"].to_torch_state_dict(),
                        str(config["tokenizer"]))
    content = RecordDict({"arrays": ArrayRecord(reply.arrays), "metrics": MetricRecord(reply.metrics)})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    from moekit.federate.client import evaluate_round
    out, index = _client(context)
    metrics = evaluate_round(out, index, msg.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

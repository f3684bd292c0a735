"""The Flower apps: ``server_app`` (the rounds, moekit.federate.server) and ``client_app``
(a client's train and evaluate, moekit.federate.client). ``moekit federate`` points a Flower
app directory at these two objects; a SuperNode's ``--node-config`` names its client
(``out``, ``client``) and the ServerApp's run config its federation (``out``)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


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

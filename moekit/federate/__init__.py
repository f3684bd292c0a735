"""Federated MoE training on Flower (``moekit federate``).

Each client (a Flower SuperNode) holds its own data shard and trains its own moekit run
directory for ``train.max_steps`` steps a round, through the engine's ``train()``; the
server (a Flower ServerApp) averages what the strategy shares and keeps a checkpoint per
round. No text leaves a client: only weights (and a few numbers about them) travel.

    spec.py        the federation: recipe, clients' shards, strategy, rounds (federate.json)
    strategies.py  what is sent and how it is averaged (fedavg, local-experts, routing)
    client.py      a client's round: local training, evaluation, the probe diagnostics
    server.py      the server's rounds: sampling, aggregation, checkpoints, metrics
    diagnostics.py routing and expert similarity between clients
    apps.py        the Flower ServerApp and ClientApp around client.py and server.py
    launch.py      the SuperLink, the SuperNodes and ``flwr run`` on this machine
"""

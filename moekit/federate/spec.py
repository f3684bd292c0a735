"""The federation: a recipe, one data shard per client, a strategy and a number of rounds.

``moekit federate`` checks all of it before any process starts and writes it to
``OUT/federate.json``; the server and every client read it from there. A client's run is
the recipe with its own shard as ``data.corpus`` and a schedule over the whole
federation: ``train.max_steps`` (the recipe's) local steps a round, so ``rounds x
max_steps`` steps in all, logged, evaluated and saved once a round.

Layout of OUT::

    federate.json          this spec
    tokenizer.json         the one vocabulary every client reads (trained on the clients' text)
    rounds/round-NNNN/     the server's model after round N (an export directory: moekit eval,
                           generate, export read it), round.json last: the round is finished
    clients/clientI/       client I's own moekit run directory (its shard's token cache, its
                           checkpoint: with local-experts, its personalised model)
    metrics.jsonl, tensorboard/   per round: client{i}/..., bytes/..., routing/..., experts/...
    flower/                the Flower app, its configuration and every process's log
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from moekit.config import RunConfig
from moekit.store.run_dir import write_json

SPEC = "federate.json"
STRATEGIES = ("fedavg", "local-experts", "routing")
STRATEGY_HELP = {"fedavg": "FedAvg of every parameter",
                 "local-experts": "FedAvg of the shared (non-expert) parameters; each client keeps its "
                                  "experts",
                 "routing": "FedAvg; routers and experts averaged weighted by each client's routing counts"}


@dataclass
class FederationSpec:
    recipe: dict                        # RunConfig.to_dict() of the recipe (+ --set)
    shards: list[str]                   # client i trains on shards[i] (a corpus, "corpus:tag" or a path)
    rounds: int
    strategy: str = "fedavg"
    min_clients: int | None = None      # a round goes on with this many replies (None: all but one)
    round_timeout: float = 3600.0       # seconds a round waits for its clients
    cross_eval: bool = True             # each client's model on every client's validation data
    threads: int = 1                    # torch threads per client process
    seed_note: str = field(default="")  # free text: what made this federation (the command line)

    def __post_init__(self) -> None:
        check_spec(self)

    @property
    def clients(self) -> int:
        return len(self.shards)

    @property
    def quorum(self) -> int:
        """Replies a round needs: min_clients, else all but one (one client may drop)."""
        return self.min_clients if self.min_clients is not None else max(1, self.clients - 1)

    @property
    def local_steps(self) -> int:
        return int(self.recipe["train"]["max_steps"])

    @property
    def probe_seed(self) -> int:
        """The seed of the routing probe every client runs (moekit.federate.diagnostics)."""
        return int(self.recipe["train"].get("seed", 0)) + 7919

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.recipe)

    def client_config(self, i: int) -> RunConfig:
        """Client ``i``'s run: its shard, the federation's schedule, one log/eval/save a round."""
        cfg = self.run_config()
        total = self.rounds * self.local_steps
        train = dataclasses.replace(cfg.train, max_steps=total, log_every=self.local_steps,
                                    eval_every=self.local_steps, save_every=self.local_steps,
                                    warmup_steps=min(cfg.train.warmup_steps, total - 1))
        data = dataclasses.replace(cfg.data, corpus=self.shards[i])
        return dataclasses.replace(cfg, data=data, train=train)

    def save(self, out: Path) -> None:
        write_json(Path(out) / SPEC, dataclasses.asdict(self))

    @classmethod
    def load(cls, out: Path) -> FederationSpec:
        path = Path(out) / SPEC
        if not path.exists():
            raise FileNotFoundError(f"{str(out)!r} holds no federation ({SPEC} is missing); give the "
                                    "--out of "
                                    "a `moekit federate` run")
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: not a federation spec ({err}); it was not written by moekit "
                             "federate, or it is damaged") from None


def client_dir(out: Path, i: int) -> Path:
    return Path(out) / "clients" / f"client{i}"


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"--strategy {name!r}: no such strategy; use one of {', '.join(STRATEGIES)}")


def check_spec(spec: FederationSpec) -> None:
    """The checks that need no data: one line each, naming the flag and the fix."""
    check_strategy(spec.strategy)
    if not isinstance(spec.rounds, int) or isinstance(spec.rounds, bool) or spec.rounds < 1:
        raise ValueError(f"--rounds {spec.rounds!r}: a federation needs at least one round; "
                         "use e.g. --rounds 5")
    if not spec.shards:
        raise ValueError("--clients 0: a federation needs at least one client; use e.g. --clients 4")
    if spec.min_clients is not None and not 1 <= spec.min_clients <= spec.clients:
        raise ValueError(f"--min-clients {spec.min_clients}: must be between 1 and the number of clients "
                         f"({spec.clients})")
    if not spec.round_timeout > 0:
        raise ValueError(f"--round-timeout {spec.round_timeout}: must be > 0 seconds")
    if not isinstance(spec.threads, int) or spec.threads < 1:
        raise ValueError(f"--threads {spec.threads!r}: torch threads per client must be an integer >= 1; "
                         "use e.g. --threads 1")
    cfg = spec.run_config()                 # the recipe's own fields check themselves
    if cfg.data.mixture is not None or cfg.data.task is not None:
        raise ValueError("data.mixture / data.task: a federated client trains a language model on its own "
                         "shard; drop them and give the shards with --shard (or the corpus to split by tag)")
    if cfg.parallel.world_size != 1:
        raise ValueError(f"parallel = {cfg.parallel}: each federated client is one process; drop the "
                         "parallel settings from the recipe")
    if spec.strategy != "fedavg" and cfg.model.moe is None:
        raise ValueError(f"--strategy {spec.strategy}: the recipe's model is dense (no model.moe), so it has "
                         "no experts or routers to treat apart; use --strategy fedavg or an MoE recipe")
    if cfg.model.moe is not None and cfg.model.moe.router_input != "token":
        raise ValueError(f"model.moe.router_input={cfg.model.moe.router_input!r}: a federated client's shard "
                         "is one tag, so routing by tag has nothing to choose; use router_input=\"token\"")
    if cfg.model.moe is not None and not cfg.train.telemetry:
        raise ValueError("train.telemetry=false: a federated MoE client reports its tokens per expert (the "
                         "routing strategy's weights, the routing diagnostics); drop train.telemetry=false")
    if cfg.train.init_from is not None or cfg.distill.teacher is not None:
        field_ = "train.init_from" if cfg.train.init_from is not None else "distill.teacher"
        raise ValueError(f"{field_}: a federation starts every client from the server's round-0 model, "
                         "built from the recipe's seed; drop it (start from weights with moekit train --from "
                         "after the federation, or federate a fresh model)")
    ft = cfg.finetune
    if ft.lora_rank is not None or ft.freeze != "none":
        raise ValueError("finetune.*: a federated client trains and sends every tensor the strategy shares; "
                         "drop finetune.lora_rank / finetune.freeze from the recipe")
    if cfg.train.expert_schedule is not None:
        raise ValueError("train.expert_schedule: clients cannot grow their experts mid-federation (the "
                         "server averages tensors of one shape); drop it")


# the server's kept rounds: OUT/rounds/round-NNNN, complete once round.json is written
ROUND_FILE = "round.json"


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "rounds" / f"round-{r:04d}"


def last_round(out: Path) -> int:
    """The last round the server kept (0: the initial model), by its round.json."""
    done = [int(p.name.split("-")[1]) for p in (Path(out) / "rounds").glob("round-*")
            if (p / ROUND_FILE).exists() and p.name.split("-")[1].isdigit()]
    return max(done, default=0)

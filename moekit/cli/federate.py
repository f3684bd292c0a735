"""moekit federate: federated MoE training on Flower, one process per client.

    moekit federate --config configs/tiny-moe.toml --set train.max_steps=50 --clients 4 --rounds 5 \\
        --strategy local-experts --out runs/fed      # parlspeech split by language, one per client
    moekit federate --resume runs/fed                # after a crash: on from the last finished round
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def register(sub) -> None:
    from moekit.federate.spec import STRATEGY_HELP
    p = sub.add_parser("federate", help="federated training on Flower: each client trains on its own data",
                       allow_abbrev=False,
                       description="Train one MoE across clients that each keep their own data (Flower's "
                                   "deployment engine: a SuperLink, one SuperNode per client, on this "
                                   "machine). train.max_steps is each client's local steps per round. "
                                   "Writes OUT/rounds/round-NNNN (the server's model per round), "
                                   "OUT/clients/clientI (each client's run), metrics.jsonl and TensorBoard.")
    p.add_argument("--config", help="the recipe (a TOML file, as for moekit train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the recipe, as for moekit train")
    p.add_argument("--clients", type=int, help="number of clients (default: one per --shard, or per tag of "
                                               "the recipe's corpus)")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--strategy",
                   help="; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items()) + " (default fedavg)")
    p.add_argument("--shard", action="append", default=[], metavar="DATA",
                   help="one client's data: a corpus, corpus:tag or a path (repeat, one per client; default: "
                        "the recipe's corpus split by tag)")
    p.add_argument("--min-clients", type=int, help="replies a round needs (default: all clients but one)")
    p.add_argument("--round-timeout", type=float, metavar="S",
                   help="seconds a round waits for its clients (default 3600)")
    p.add_argument("--threads", type=int, help="torch threads per client process (default 1)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="a tokenizer.json every client uses (default: trained on the clients' training text)")
    p.add_argument("--no-cross-eval", action="store_true",
                   help="skip client{i}/val_loss_on_client{j} (each client's model on the others' data)")
    p.add_argument("--out", help="the federation's directory (new)")
    p.add_argument("--resume", metavar="OUT",
                   help="continue the federation in OUT from its last finished round")
    p.set_defaults(run=run)


def run(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("moekit federate starts its own processes (one per client); run it without torchrun")
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.resume is not None:
        out = _check_resume(args)
    else:
        out = _new(args)
    from moekit.federate.launch import run_federation
    from moekit.federate.spec import FederationSpec
    spec = FederationSpec.load(out)
    print(f"federation in {out}: {spec.clients} clients ({', '.join(spec.shards)}), {spec.rounds} rounds of "
          f"{spec.local_steps} local steps, strategy {spec.strategy}; a round needs {spec.quorum} of "
          f"{spec.clients} replies; "
          f"logs in {out / 'flower'}", flush=True)
    t0 = time.time()
    try:
        done = run_federation(out)
    except RuntimeError as err:
        print(f"moekit federate: error: {err}", file=sys.stderr)
        return 1
    server = f"{out}/rounds/round-{done:04d}"
    clients = f"{out}/clients/client<i>"
    models = (f"each client's own model (its experts): {clients}; the server's shared tensors (with round "
              f"0's experts): {server}" if spec.strategy == "local-experts" else
              f"the server's model: {server}; each client's after its last local steps: {clients}")
    print(f"done: {done} rounds in {time.time() - t0:.0f} s; {models} (moekit eval, generate, export read "
          f"them); moekit report {out}")
    return 0


def _check_resume(args) -> Path:
    given = [f for f, v in (("--config", args.config), ("--set", args.set), ("--clients", args.clients),
                            ("--rounds", args.rounds), ("--shard", args.shard), ("--out", args.out),
                            ("--tokenizer", args.tokenizer), ("--min-clients", args.min_clients),
                            ("--strategy", args.strategy), ("--round-timeout", args.round_timeout),
                            ("--threads", args.threads), ("--no-cross-eval", args.no_cross_eval))
             if v is not None and v != [] and v is not False]
    if given:
        raise ValueError(f"--resume continues the federation as it was made; drop {given[0]} (its "
                         "settings are in OUT/federate.json)")
    out = Path(args.resume)
    from moekit.federate.spec import FederationSpec
    FederationSpec.load(out)                # a clear line if it is not a federation
    return out


def _new(args) -> Path:
    """Check everything, then write OUT: federate.json, tokenizer.json, rounds/round-0000."""
    from moekit.config import RunConfig, apply_overrides
    from moekit.federate import prepare
    from moekit.federate.server import round_dir
    from moekit.federate.spec import SPEC, FederationSpec, check_strategy
    from moekit.recipe import load_toml
    from moekit.store import run_dir as rd
    if args.out is None:
        raise ValueError("moekit federate needs --out DIR (a new directory), or --resume DIR")
    args.strategy = args.strategy or "fedavg"
    check_strategy(args.strategy)             # before any data is read
    if args.rounds is None:
        raise ValueError("--rounds is required: the number of federated rounds, e.g. --rounds 5")
    if args.clients is not None and args.clients < 1:
        raise ValueError(f"--clients {args.clients}: a federation needs at least one client; "
                         "use e.g. --clients 4")
    raw = apply_overrides(load_toml(args.config) if args.config else {}, args.set)
    cfg = RunConfig.from_dict(raw)
    if args.shard and args.clients is not None and args.clients != len(args.shard):
        raise ValueError(f"--clients {args.clients} but {len(args.shard)} --shard given: one shard per "
                         "client; "
                         "drop --clients or give one --shard each")
    shards = list(args.shard) or prepare.default_shards(cfg, args.clients)
    spec = FederationSpec(recipe=cfg.to_dict(), shards=shards, rounds=args.rounds, strategy=args.strategy,
                          min_clients=args.min_clients,
                          round_timeout=3600.0 if args.round_timeout is None else args.round_timeout,
                          cross_eval=not args.no_cross_eval,
                          threads=1 if args.threads is None else args.threads,
                          seed_note="moekit federate " + " ".join(getattr(args, "raw_argv", [])))
    out = Path(args.out)
    if (out / SPEC).is_file():                # a federation, finished or not: --resume continues it
        raise ValueError(f"--out {str(out)!r} already holds a federation ({SPEC}); continue it with "
                         f"--resume {out} or choose another --out")
    rd.check_fresh(out)
    texts = prepare.shard_texts(cfg, shards)
    tok = prepare.shared_tokenizer(cfg, texts, args.tokenizer)
    prepare.check_sizes(cfg, shards, texts, tok)
    made = rd.create(out)
    try:
        prepare.save_shared_tokenizer(tok, out)
        prepare.initial_model(cfg, tok, round_dir(out, 0))
        spec.save(out)                      # last: a directory with federate.json is a federation
    except BaseException:
        rd.discard(out, made)
        raise
    return out

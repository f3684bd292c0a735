"""The server's bookkeeping: the last kept round, and a kept round's row logged again when the
server stopped between keeping and logging it."""

import json

from moekit.federate.server import ROUND_FILE, _log_kept_rounds, last_round, round_dir, summary_line
from moekit.train.metrics import MetricsWriter


def test_a_kept_but_unlogged_round_is_logged_once_on_restart(tmp_path):
    for r in (1, 2):
        round_dir(tmp_path, r).mkdir(parents=True)
        kept = {"round": r, "metrics": {"val_loss/mean": r}}
        (round_dir(tmp_path, r) / ROUND_FILE).write_text(json.dumps(kept))
    round_dir(tmp_path, 3).mkdir()                  # a round cut short: no round.json
    assert last_round(tmp_path) == 2
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss/mean": 1}) + "\n")
    writer = MetricsWriter(tmp_path, tensorboard=False, purge_after=2)
    _log_kept_rounds(tmp_path, 2, writer)
    _log_kept_rounds(tmp_path, 2, writer)           # twice: still once
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss/mean"]) for r in rows] == [(1, 1), (2, 2)]


def test_summary_line_names_every_client():
    row = {"client0/val_loss": 5.0, "client1/val_loss": 6.0, "val_loss/mean": 5.5, "clients/trained": 2.0,
           "clients/failed": 1.0, "bytes/total": 3 * 2**20, "time/round_s": 12.0}
    assert summary_line(row) == ("val_loss mean 5.500 (client0 5.000 client1 6.000); 2 trained, 1 failed; "
                                 "3.0 MiB; 12 s")

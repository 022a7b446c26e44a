"""A numpy-only Flower app for the runtime tests: FedAvg of one array, 3 values.

The server starts from zeros; each round every site that answers returns
``weights + node_config["delta"] * [1, 2, 3]`` and the server averages the answers. Sites that
do not answer within ``round-timeout`` seconds are left out of that round and the next ones (a
killed SuperNode stays listed by the SuperLink until its heartbeat expires; a restarted one
comes back with a new node id).

Run config keys (all strings/numbers, as Flower's run config allows):
``num-rounds``, ``min-nodes`` (wait for that many SuperNodes before round 1),
``round-timeout`` (seconds), ``out-dir`` (the server writes ``round-<r>.json`` after each
round and ``final.json`` at the end), ``pause-after`` (optional: comma-separated rounds after
which the server waits for ``resume-<r>`` in ``out-dir``; a test uses it to kill or restart a
site at a known point).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

STEP = np.array([1.0, 2.0, 3.0])

server = ServerApp()
client = ClientApp()


def _write_json(path: Path, record: dict) -> None:
    """Write ``path`` whole: a test polling for it never reads half a file."""
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").replace(path)


def _wait_for(check, what: str, limit_s: float = 120.0) -> None:
    """Poll ``check()`` every 0.1 s; fail the run (raise) when ``limit_s`` passes."""
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"toy server: waited {limit_s}s for {what}")
        time.sleep(0.1)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["out-dir"]))
    pauses = {int(r) for r in str(cfg.get("pause-after", "")).split(",") if r}
    min_nodes = int(cfg["min-nodes"])
    _wait_for(lambda: len(list(grid.get_node_ids())) >= min_nodes, f"{min_nodes} nodes")

    weights, dropped = np.zeros(3), set()
    for rnd in range(1, int(cfg["num-rounds"]) + 1):
        content = RecordDict(
            {"arrays": ArrayRecord([weights]), "config": ConfigRecord({"round": rnd})}
        )
        nodes = [node for node in grid.get_node_ids() if node not in dropped]
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes
        ]
        replies = [
            m
            for m in grid.send_and_receive(messages, timeout=float(cfg["round-timeout"]))
            if m.has_content()
        ]
        dropped |= set(nodes) - {m.metadata.src_node_id for m in replies}
        if not replies:
            raise RuntimeError(f"toy server: no site answered in round {rnd}")
        arrays = [m.content["arrays"].to_numpy_ndarrays()[0] for m in replies]
        weights = np.mean(arrays, axis=0)
        sites = sorted(str(m.content["meta"]["site"]) for m in replies)
        record = {"round": rnd, "sites": sites, "weights": weights.tolist()}
        _write_json(out / f"round-{rnd}.json", record)
        if rnd in pauses:
            _wait_for((out / f"resume-{rnd}").exists, f"resume-{rnd}")

    final = {"weights": weights.tolist(), "run_config": dict(cfg)}
    _write_json(out / "final.json", final)


@client.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()[0]
    update = weights + float(context.node_config["delta"]) * STEP
    content = RecordDict(
        {
            "arrays": ArrayRecord([update]),
            "meta": ConfigRecord({"site": str(context.node_config["site"])}),
        }
    )
    return Message(content, reply_to=msg)


broken_server = ServerApp()


@broken_server.main()
def broken_main(grid: Grid, context: Context) -> None:
    raise ValueError("toy server failed on purpose")

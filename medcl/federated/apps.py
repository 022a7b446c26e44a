"""The Flower apps of ``medcl federate``: a ServerApp running :func:`~medcl.federated.server.serve`
and a ClientApp running a :class:`~medcl.federated.site.Site`, on Flower's message API.

The run config carries the resolved medcl config as YAML text (``medcl-config``), so a site needs
no copy of the file; a SuperNode names its site in its node config (``site``, optionally
``site-dir``: where its run directory lives). Under the simulation engine a node knows only its
``partition-id``, which is the index of its site in ``federation.sites``.

Every message is built here: arrays travel as one ``ArrayRecord`` (``arrays``), numbers as one
``MetricRecord`` (``metrics``), settings as one ``ConfigRecord`` (``config``), nothing else.
"""

from __future__ import annotations

__all__ = ["build_client_app", "build_server_app", "client_app", "server_app"]

import json
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from medcl.config import RunConfig, validate_config
from medcl.engine.threads import resolve_threads, use_threads
from medcl.federated.server import Reply, Request, serve
from medcl.federated.site import Site
from medcl.progress import show_progress

CONFIG_KEY = "medcl-config"


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _records(arrays: dict[str, np.ndarray], metrics: dict[str, Any], config: dict[str, Any]):
    content = RecordDict()
    content["arrays"] = _array_record(arrays)
    content["metrics"] = MetricRecord(metrics)
    content["config"] = ConfigRecord(config)
    return content


def _unpack(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    arrays = content.array_records.get("arrays")
    metrics = content.metric_records.get("metrics")
    config = content.config_records.get("config")
    return (
        {k: v.numpy() for k, v in arrays.items()} if arrays is not None else {},
        dict(metrics) if metrics is not None else {},
        dict(config) if config is not None else {},
    )


class GridLink:
    """:class:`~medcl.federated.server.Link` over a Flower ``Grid``.

    ``fedavgm`` aggregates with ``FedAvg``'s weighted mean; the server applies FedAvgM's step to
    the parameters itself (:mod:`medcl.federated.server_opt`: Flower's ``FedAvgM`` would step the
    BatchNorm statistics too).
    """

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid = grid
        fed = cfg.federation
        kwargs = {"min_train_nodes": 1, "min_available_nodes": 1, "min_evaluate_nodes": 1}
        self.strategy = (
            FedProx(proximal_mu=fed.proximal_mu, **kwargs)
            if fed.aggregation == "fedprox"
            else FedAvg(**kwargs)
        )

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]:
        messages = [
            Message(
                content=_records(q.arrays, {}, q.config), dst_node_id=q.node, message_type=q.kind
            )
            for q in requests
        ]
        out = []
        for m in self.grid.send_and_receive(messages, timeout=timeout):
            node = m.metadata.src_node_id
            if m.has_error():
                out.append(Reply(node, error=str(m.error.reason)))
                continue
            arrays, metrics, config = _unpack(m.content)
            out.append(Reply(node, arrays, metrics, config))
        return out

    def aggregate(self, replies: Sequence[Reply], round_: int) -> dict[str, np.ndarray]:
        """Flower's FedAvg aggregation (``FedAvg``/``FedProx.aggregate_train`` call it): the
        mean of the replies' arrays weighted by ``num-examples``."""
        records = []
        for r in replies:
            content = RecordDict()
            content["arrays"] = _array_record(r.arrays)
            content["metrics"] = MetricRecord({"num-examples": r.metrics["num-examples"]})
            records.append(content)
        arrays = aggregate_arrayrecords(records, self.strategy.weighted_by_key)
        return {k: v.numpy() for k, v in arrays.items()}


def _config(text: str) -> RunConfig:
    import yaml

    return validate_config(yaml.safe_load(text), source="the federated run's config")


def build_server_app(cfg: RunConfig | None = None, run_dir: Path | None = None) -> ServerApp:
    """The ServerApp; without arguments it reads them from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        conf = cfg if cfg is not None else _config(str(context.run_config[CONFIG_KEY]))
        folder = run_dir if run_dir is not None else Path(str(context.run_config["run-dir"]))
        serve(conf, folder, GridLink(grid, conf), say=lambda line: log(INFO, "medcl: %s", line))

    return app


def build_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """The ClientApp; without a config it reads the one the run config carries."""
    app = ClientApp()

    def handle(context: Context, work):
        """``work(site)`` with the run's thread count, on this node's site."""
        conf = cfg if cfg is not None else _config(str(context.run_config[CONFIG_KEY]))
        node = context.node_config
        if "site" in node:
            name = str(node["site"])
        else:  # simulation engine: the partition index is the site's position
            name = conf.federation.site_names[int(node["partition-id"])]
        folder = Path(str(node["site-dir"])) if node.get("site-dir") else None
        threads = resolve_threads(conf.train.num_threads).threads
        with use_threads(threads), show_progress(False):  # a site's bars are noise in logs
            return work(Site(conf, name, folder))

    def reply(message: Message, arrays, metrics, config=None) -> Message:
        return Message(content=_records(arrays, metrics, config or {}), reply_to=message)

    @app.query("describe")
    def describe(message: Message, context: Context) -> Message:
        text = handle(context, lambda s: json.dumps(s.describe()))
        return reply(message, {}, {}, {"describe": text})

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays, _, c = _unpack(message.content)
        t, v, mu, r = (
            int(c["experience"]),
            int(c["version"]),
            float(c["proximal-mu"]),
            int(c["round"]),
        )
        return reply(message, *handle(context, lambda s: s.train(t, arrays, v, mu, r)))

    @app.train("consolidate")
    def consolidate(message: Message, context: Context) -> Message:
        arrays, _, c = _unpack(message.content)
        t, v = int(c["experience"]), int(c["version"])
        return reply(message, *handle(context, lambda s: s.consolidate(t, arrays, v)))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        arrays, _, c = _unpack(message.content)
        t, v = int(c["experience"]), int(c["version"])

        def work(s: Site) -> dict[str, Any]:
            metrics = s.evaluate(t, arrays, v)
            if c.get("last"):
                s.write_report()
            return metrics

        return reply(message, {}, handle(context, work))

    return app


#: the components a deployment's Flower app names (``medcl.federated.apps:server_app``)
server_app = build_server_app()
client_app = build_client_app()

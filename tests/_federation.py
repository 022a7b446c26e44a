"""An in-process stand-in for Flower's Grid: each message builds a fresh Site, as a SuperNode's
ClientApp process does, so what the server and sites exchange is exactly what Flower carries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcl.config import RunConfig
from medcl.engine.threads import use_threads
from medcl.federated.apps import GridLink
from medcl.federated.server import Reply, Request
from medcl.federated.site import Site


class LocalLink:
    """:class:`medcl.federated.server.Link` calling :class:`Site` directly (node id = index + 1).

    ``dead`` names sites that do not answer (a killed SuperNode); ``renumber`` gives a site a new
    node id (a restarted SuperNode); ``sent`` keeps every (request, reply or None, site) for inspection.
    """

    def __init__(self, cfg: RunConfig, folders: Path, fail_after: int | None = None) -> None:
        self.cfg, self.folders = cfg, Path(folders)
        self.names = cfg.federation.site_names
        self.node_of = {n: i + 1 for i, n in enumerate(self.names)}
        self.dead: set[str] = set()
        self.sent: list[tuple[Request, Reply | None, str]] = []
        self.fail_after = fail_after  # raise after this many exchanges (a server crash)
        self.exchanges = 0

    def renumber(self, name: str) -> None:
        self.node_of[name] = max(self.node_of.values()) + 1

    def nodes(self) -> list[int]:
        return sorted(v for k, v in self.node_of.items() if k not in self.dead)

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]:
        self.exchanges += 1
        if self.fail_after is not None and self.exchanges > self.fail_after:
            raise KeyboardInterrupt("server stopped")
        site_of = {v: k for k, v in self.node_of.items()}
        out = []
        for q in requests:
            name = site_of.get(q.node)
            if name is None or name in self.dead:
                self.sent.append((q, None, name))
                continue
            with use_threads(1):
                reply = self._handle(Site(self.cfg, name, self.folders / name), q)
            self.sent.append((q, reply, name))
            out.append(reply)
        return out

    @staticmethod
    def _handle(site: Site, q: Request) -> Reply:
        c = q.config
        if q.kind == "query.describe":
            return Reply(q.node, config={"describe": json.dumps(site.describe())})
        if q.kind == "train":
            args = (c["experience"], q.arrays, c["version"], c["proximal-mu"], c["round"])
            return Reply(q.node, *site.train(*args))
        if q.kind == "train.consolidate":
            return Reply(q.node, *site.consolidate(c["experience"], q.arrays, c["version"]))
        metrics = site.evaluate(c["experience"], q.arrays, c["version"])
        if c.get("last"):
            site.write_report()
        return Reply(q.node, {}, metrics)

    def aggregate(self, replies: Sequence[Reply], round_: int) -> dict[str, np.ndarray]:
        return GridLink(None, self.cfg).aggregate(replies, round_)  # Flower's FedAvg / FedProx

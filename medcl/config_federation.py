"""The ``federation`` section of a run configuration (``medcl federate``; docs/federated.md).

Re-exported by :mod:`medcl.config` with the other sections (:mod:`medcl.config_sections`).
"""

from __future__ import annotations

__all__ = ["FederationConfig", "TLSConfig"]

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    """Flower's TLS files (PEM): the CA everyone trusts; the SuperLink's certificate and key."""

    ca_certificate: Path
    certificate: Path | None = Field(None, description="SuperLink certificate (started here)")
    private_key: Path | None = Field(None, description="SuperLink private key (started here)")


class FederationConfig(_Strict):
    """``medcl federate``: sites, rounds, aggregation and the Flower runtime (docs/federated.md)."""

    sites: int | list[str] = Field(
        3, description="number of sites (named site-0, site-1, ...) or their names"
    )
    partition: Literal["split", "experience"] = Field(
        "split",
        description="'split': each experience divided among the sites (stratified); "
        "'experience': experience i held whole by site i mod n",
    )
    rounds: int = Field(
        2, ge=1, description="rounds per experience; train.epochs local epochs each"
    )
    aggregation: Literal["fedavg", "fedprox", "fedavgm", "fednova"] = Field(
        "fedavg",
        description="'fedavg': weighted mean; 'fedprox': + a proximal term at the sites; "
        "'fedavgm': + a server step (server_lr, server_momentum) on the mean's update; "
        "'fednova': each site's update divided by its number of local steps (SGD only)",
    )
    proximal_mu: float = Field(0.01, ge=0, description="FedProx's mu (aggregation: fedprox)")
    server_lr: float = Field(
        1.0, gt=0, description="FedAvgM's server learning rate (aggregation: fedavgm)"
    )
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="FedAvgM's server momentum (aggregation: fedavgm)"
    )
    batchnorm: Literal["mean", "local"] = Field(
        "mean",
        description="BatchNorm statistics a site scores and exports with: 'mean' the global "
        "model's (averaged like any tensor); 'local' its own, re-estimated on its rows (SiloBN)",
    )
    batchnorm_anchor: bool = Field(
        True,
        description="with batchnorm 'local': a site with no new images in an experience "
        "corrects its memory's statistics by how they differed from its cohort's when it last "
        "held one (false: the memory's as they are)",
    )
    min_sites: int = Field(1, ge=1, description="replies a round needs to be aggregated")
    retries: int = Field(1, ge=0, description="times a round with too few replies is repeated")
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies")
    join_timeout: float = Field(300.0, gt=0, description="seconds to wait for the sites at start")
    engine: Literal["deployment", "simulation"] = Field(
        "deployment",
        description="'deployment': SuperLink + one SuperNode process per site (loopback unless "
        "`superlink` is set); 'simulation': Flower's simulation engine in one process",
    )
    superlink: str | None = Field(
        None, description="HOST:PORT of an existing SuperLink's Control API (default: start one)"
    )
    tls: TLSConfig | None = None

    @property
    def site_names(self) -> list[str]:
        if isinstance(self.sites, int):
            return [f"site-{i}" for i in range(self.sites)]
        return list(self.sites)

    @model_validator(mode="after")
    def _check_sites(self) -> FederationConfig:
        names = self.site_names
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sites must be a positive count or distinct names; got {self.sites}")
        bad = [n for n in names if not re.fullmatch(r"[\w.-]+", n)]
        if bad:
            raise ValueError(f"site names are letters, digits, _ - . only; got {bad}")
        if self.min_sites > len(names):
            raise ValueError(
                f"min_sites ({self.min_sites}) is larger than the number of sites ({len(names)})"
            )
        server = {
            "server_lr": (self.server_lr, 1.0),
            "server_momentum": (self.server_momentum, 0.0),
        }
        changed = {k: v for k, (v, default) in server.items() if v != default}
        if changed and self.aggregation != "fedavgm":
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in changed.items())}: FedAvgM's server step, "
                f"used by aggregation 'fedavgm' only; got aggregation {self.aggregation!r}. Set "
                f"aggregation: fedavgm, or remove {' and '.join(changed)}"
            )
        if not self.batchnorm_anchor and self.batchnorm != "local":
            raise ValueError(
                "batchnorm_anchor applies to batchnorm 'local' only (it corrects each site's own "
                f"BatchNorm statistics); got batchnorm {self.batchnorm!r}. Set batchnorm: local, "
                "or remove batchnorm_anchor"
            )
        if self.engine == "simulation" and (self.superlink or self.tls):
            raise ValueError("engine 'simulation' runs in one process: remove superlink and tls")
        host = (self.superlink or "").rpartition(":")[0].strip("[]")
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        if self.superlink is not None and self.tls is None and not loopback:
            raise ValueError(
                f"superlink {self.superlink!r} is not a loopback address: model updates would "
                "cross the network in clear; set federation.tls (ca_certificate, ...)"
            )
        return self

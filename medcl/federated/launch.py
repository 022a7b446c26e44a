"""``medcl federate CONFIG``: check everything, then run the sites and the server on Flower.

Under ``federation.engine: deployment`` (default) one SuperLink and one SuperNode per site are
started as processes on loopback (:class:`~medcl.federated.flower_runtime.LocalFederation`) and
the run is submitted as a Flower app; with ``federation.superlink`` the run is submitted to that
SuperLink and the sites' SuperNodes are expected to be running already (each hospital starts its
own, see docs/federated.md). ``engine: simulation`` runs Flower's simulation engine in this
process (Ray), for quick runs. Every refusal comes before any process starts.
"""

from __future__ import annotations

__all__ = ["check_federation", "federate", "site_nodes"]

from pathlib import Path

from medcl.config import RunConfig, resolved_yaml
from medcl.engine.rundir import check_output_dir
from medcl.errors import ConfigError
from medcl.federated.site import check_federated_strategy, site_dir

SERVER_APP = "medcl.federated.apps:server_app"
CLIENT_APP = "medcl.federated.apps:client_app"


def check_federation(cfg: RunConfig, *, resume: bool) -> Path:
    """Every refusal of :func:`federate`, before anything starts; returns the run directory."""
    if cfg.federation is None:
        raise ConfigError(
            "the config has no `federation` section; add one (sites, rounds, ...: see "
            "docs/federated.md and configs/federated-pneumonia-sites-replay.yaml) or train here "
            "with `medcl run`."
        )
    check_federated_strategy(cfg.strategy.name)
    if cfg.federation.batchnorm != "mean" and cfg.strategy.name in ("acl", "dynammo"):
        raise ConfigError(
            f"federation.batchnorm {cfg.federation.batchnorm!r} re-estimates the statistics of "
            f"every trained BatchNorm; {cfg.strategy.name!r} keeps a frozen backbone and "
            "per-experience adapter statistics. Remove federation.batchnorm (or set it to 'mean')."
        )
    if cfg.federation.aggregation == "fednova" and cfg.train.optimizer != "sgd":
        raise ConfigError(
            "federation.aggregation 'fednova' normalises each site's update by the coefficients "
            f"of SGD's steps; got train.optimizer {cfg.train.optimizer!r}. Set train.optimizer: "
            "sgd, or choose another aggregation (fedavg, fedprox, fedavgm)."
        )
    if cfg.train.early_stopping_patience is not None:
        raise ConfigError(
            "train.early_stopping_patience is not supported by medcl federate (a site trains "
            "train.epochs local epochs per round); remove it or set the epochs."
        )
    check_output_dir(cfg.output_dir)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise ConfigError(
            f"run directory {run_dir} already exists; pass --resume to continue it, or choose "
            "another `name` (--set name=...) to start a new run."
        )
    if resume and not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} does not exist; start it without --resume.")
    # (--resume of a run stopped before the server saved a state starts it again: every site
    # holds on disk the server version it last received, the initial one until then)
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(
            'medcl federate needs Flower: pip install "medcl[federated]" (flwr[simulation]).'
        ) from None
    tls = cfg.federation.tls
    for path in [tls.ca_certificate, tls.certificate, tls.private_key] if tls else []:
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"federation.tls: {path} does not exist; check the path.")
    return run_dir


def site_nodes(cfg: RunConfig) -> list:
    """One SuperNode per site: its name and where its run directory lives."""
    from medcl.federated.flower_runtime import SiteNode

    return [
        SiteNode(n, {"site": n, "site-dir": str(site_dir(cfg, n).resolve())})
        for n in cfg.federation.site_names
    ]


def federate(cfg: RunConfig, *, resume: bool = False, quiet: bool = False) -> Path:
    """Run the federated stream of ``cfg`` to the end (or continue it); return the run directory.

    Raises:
        ConfigError: see :func:`check_federation`; a TLS or address mistake.
        FederationRunError: a Flower process did not start or the run failed (the ServerApp's
            log tail in the message).
    """
    run_dir = check_federation(cfg, resume=resume)
    fed = cfg.federation
    from medcl.federated import flower_runtime as flower

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolved_yaml(cfg)
    run_config = {"medcl-config": resolved, "run-dir": str(run_dir.resolve())}
    workdir = run_dir / "federated" / "flower"
    sites = site_nodes(cfg)
    if fed.engine == "simulation":
        flower.run_simulation_engine(
            SERVER_APP, CLIENT_APP, sites=sites, workdir=workdir, run_config=run_config,
            quiet=quiet,
        )  # fmt: skip
        return run_dir
    tls = (
        flower.TLSFiles(fed.tls.ca_certificate, fed.tls.certificate, fed.tls.private_key)
        if fed.tls is not None
        else None
    )
    flower.run_deployment(
        SERVER_APP, CLIENT_APP, sites=[] if fed.superlink else sites, workdir=workdir,
        run_config=run_config, superlink=fed.superlink, tls=tls, quiet=quiet,
    )  # fmt: skip
    return run_dir

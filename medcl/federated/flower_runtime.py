"""Run a Flower ServerApp and ClientApp (``"module:attr"``) for real: deployment or simulation.

**Deployment** (:class:`LocalFederation`, :func:`run_deployment`): ``flower-superlink``, a
``flower-supernode`` per site and ``flwr run APP SUPERLINK --stream`` as processes (Flower 1.42);
one HTTP(S) port serves a SuperLink's Fleet, Control and Runtime APIs. A run is a tiny app
directory: ``pyproject.toml`` names the components and holds ``run_config`` as
``[tool.flwr.app.config]`` (Flower ignores ``--run-config`` keys not there); ``flwr run`` builds
the FAB and submits it to ``[superlink.medcl]`` of ``$FLWR_HOME/config.toml``. Each process gets
``FLWR_HOME`` in ``workdir``, the caller's ``sys.path`` as ``PYTHONPATH`` and this interpreter's
``bin`` first on ``PATH`` (Flower starts ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` by name), and logs to ``workdir/logs/<name>.log``.

Isolation ``subprocess`` (the default): a SuperLink's ``flower-superexec`` starts a
``flwr-serverapp`` process per run; a SuperNode's starts a ``flwr-clientapp`` process **per
message**: it pulls the message and the Context, runs, pushes the reply and the Context, exits.
Nothing stays in Python between messages; ``context.state`` stays in the SuperNode's memory for
the run (lost with it): keep site state on disk. SuperNodes and the ServerApp's grid poll every
3 s, so a round costs seconds. A killed SuperNode stays in ``grid.get_node_ids()`` until its
heartbeat expires (about a minute): a ServerApp that may lose sites passes a ``timeout`` to
``send_and_receive``; a restarted site comes back with a new node id.

**Simulation** (:func:`run_simulation_engine`): ``flwr.simulation.run_simulation`` (Ray) in this
process. Both engines give the ClientApp ``node_config`` = its site's plus ``partition-id``
(index in ``sites``) and ``num-partitions``, and both apps ``run_config``. Ray actors live for
the run: module globals may outlive a message and be shared by sites (do not rely on it).
"""

from __future__ import annotations

__all__ = ["FederationRunError", "LocalFederation", "RunResult", "SiteNode", "TLSFiles",
           "run_deployment", "run_simulation_engine"]  # fmt: skip

import contextlib
import json
import logging
import os
import pkgutil
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcl.errors import ConfigError, MedclError, did_you_mean

ConfigValue = str | int | float | bool
Config = Mapping[str, ConfigValue]
_CONNECTION = "medcl"  # the SuperLink connection's name in $FLWR_HOME/config.toml
_ENV = {"PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` of app dependencies
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}  # fmt: skip


@dataclass(frozen=True)
class SiteNode:
    """One hospital: a SuperNode named ``name`` whose ClientApp sees ``node_config``."""

    name: str
    node_config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA, and the SuperLink's certificate and key (not needed to connect)."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


@dataclass(frozen=True)
class RunResult:
    """How a run ended (``"finished:completed"``; else :class:`FederationRunError` is raised)."""

    run_id: int
    status: str
    log: Path  # the ServerApp's log, as streamed by ``flwr run --stream``


class FederationRunError(MedclError, RuntimeError):
    """A Flower process did not start, or a run did not complete."""


def _tail(path: Path, lines: int = 25) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))  # no colour codes
    return "\n".join(text.splitlines()[-lines:])


def _check_config(what: str, config: Mapping[str, Any]) -> dict[str, ConfigValue]:
    if bad := [f"{k}={v!r}" for k, v in config.items() if not isinstance(v, ConfigValue)]:
        raise ConfigError(f"{what} values must be str, int, float or bool (Flower's config types); got {', '.join(bad)}. Convert them (a path to str, a list to a comma-separated str).")  # fmt: skip
    return dict(config)


def _component(ref: str, what: str) -> str:
    if not re.fullmatch(r"[\w.]+:[\w.]+", ref):
        raise ConfigError(f"{what} must name an app as 'module:attr'; got {ref!r}.")
    return ref


def _write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    import tomli_w  # a Flower dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (Flower stops its children), then SIGKILL it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)


class LocalFederation:
    """A SuperLink and a SuperNode per site as OS processes; submit runs, kill/restart sites.

    ``with LocalFederation(sites=..., workdir=...) as fed:`` starts them; leaving the block stops
    every process started, also on an error or Ctrl-C. ``superlink="host:port"`` (one running
    elsewhere) starts only the ``sites``; else a SuperLink is started on 127.0.0.1.
    ``workdir`` holds app directories, Flower homes, site configs and ``logs/``; ``tls=None``
    runs without TLS (loopback only); ``quiet=False`` prints the ServerApp's log on stderr.

    Raises ConfigError (before anything starts or is written) for an address other than
    loopback without TLS, a missing TLS file, bad site names or node_config values.
    """

    def __init__(
        self,
        *,
        sites: Sequence[SiteNode],
        workdir: Path,
        superlink: str | None = None,
        tls: TLSFiles | None = None,
        quiet: bool = True,
    ) -> None:
        names = [s.name for s in sites]
        if len(set(names)) < len(names) or not all(re.fullmatch(r"[\w.-]+", n) for n in names):
            raise ConfigError(f"sites need distinct names of letters, digits, _ - .; got {names}.")
        host = (superlink or "127.0.0.1:0").rpartition(":")[0].strip("[]")
        if tls is None and host not in ("localhost", "::1") and not host.startswith("127."):
            raise ConfigError(
                f"superlink: an address other than loopback needs TLS (model updates would cross "
                f"the network in clear); got {superlink!r} with tls=None. Pass "
                "tls=TLSFiles(ca_cert=...) or use a SuperLink on 127.0.0.1."
            )
        needed = ("ca_cert", "server_cert", "server_key")[: 3 if superlink is None else 1]
        if bad := [f"{k}={getattr(tls, k)}" for k in needed if tls and not Path(getattr(tls, k) or "").is_file()]:  # fmt: skip
            raise ConfigError(
                f"tls: {', '.join(bad)} is not a file; a SuperLink started here needs ca_cert, "
                "server_cert and server_key (PEM files), one elsewhere ca_cert. Fix the paths."
            )
        self.node_configs = {
            s.name: {"partition-id": i, "num-partitions": len(sites)}
            | _check_config(f"sites[{i}].node_config", s.node_config)
            for i, s in enumerate(sites)
        }
        self.workdir, self.tls, self.quiet = Path(workdir).resolve(), tls, quiet
        self.address = superlink  # host:port of the SuperLink
        self.node_ids: dict[str, int] = {}  # site name -> its current Flower node id
        self._procs: dict[str, subprocess.Popen] = {}  # by key: superlink, site-a, serverapp-1
        self._run, self._run_id, self._runs = "", 0, 0  # the last run's process key, id, count

    def _start(self, commands: dict[str, tuple[list[str], Path]], pattern: bytes) -> dict:
        """Start ``{key: (argv, FLWR_HOME)}`` together, each logging to ``logs/<key>.log``;
        return ``{key: group 1 of the first match of pattern in its new log lines}``."""
        offsets = {}
        for key, (argv, home) in commands.items():
            with socket.socket() as sock:  # a free port for "{port}" (Flower binds it soon)
                sock.bind(("127.0.0.1", 0))
                argv = [a.replace("{port}", str(sock.getsockname()[1])) for a in argv]
            home.mkdir(parents=True, exist_ok=True)
            env = os.environ | _ENV | {"FLWR_HOME": str(home)}
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
            env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
            with (self.workdir / "logs" / f"{key}.log").open("ab") as log:  # the child's copy
                offsets[key] = log.tell()
                self._procs[key] = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # a process group: kill reaches its children
                )  # fmt: skip
        found, deadline = {}, time.monotonic() + 120.0
        while len(found) < len(commands):
            time.sleep(0.2)
            for key in offsets.keys() - found.keys():
                with (log := self.workdir / "logs" / f"{key}.log").open("rb") as lines:
                    lines.seek(offsets[key])
                    if match := re.search(pattern, lines.read()):
                        found[key] = match.group(1).decode()
                    elif self._procs[key].poll() is not None or time.monotonic() > deadline:
                        _stop(self._procs[key])
                        name = commands[key][0][0]
                        raise FederationRunError(f"{name} failed; {log} ends:\n{_tail(log)}")
        return found

    def start_site(self, *names: str) -> dict[str, int]:
        """Start (or restart, after :meth:`kill_site`) these sites; return their new node ids."""
        tls = ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        commands = {}
        for name in map(self._site, names):
            config = _write_toml(self.workdir / "sites" / f"{name}.toml", self.node_configs[name])
            argv = ["flower-supernode", *tls, "--superlink", str(self.address), "--node-config",
                    str(config), "--isolation", "subprocess", "--port", "{port}"]  # fmt: skip
            commands[f"site-{name}"] = argv, self.workdir / "sites" / name / "flwr-home"
        started = self._start(commands, rb"SuperNode ID: (\d+)")
        self.node_ids |= {key.removeprefix("site-"): int(v) for key, v in started.items()}
        return {name: self.node_ids[name] for name in names}

    def kill_site(self, name: str) -> None:
        """SIGKILL site ``name``: its SuperNode, SuperExec and ClientApp processes (a crash)."""
        proc = self._procs[f"site-{self._site(name)}"]
        with contextlib.suppress(ProcessLookupError):  # the group outlives a dead SuperNode
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.node_ids.pop(name, None)

    def _site(self, name: str) -> str:
        if name not in self.node_configs:
            raise ConfigError(f"unknown site {name!r}; {did_you_mean(name, self.node_configs)}")
        return name

    def __enter__(self) -> LocalFederation:
        tls = self.tls  # TLS or --insecure: on the SuperLink, the SuperNodes and the CLI
        try:
            (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
            if self.address is None:
                flags = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")
                secure = [f"{f}={p}" for f, p in zip(flags, vars(tls).values(), strict=True)] if tls else ["--insecure"]  # fmt: skip
                argv = ["flower-superlink", *secure, "--port", "{port}", "--isolation",
                        "subprocess", "--disable-runtime-dependency-installation"]  # fmt: skip
                home = self.workdir / "flwr-home"
                found = self._start({"superlink": (argv, home)}, rb"Uvicorn running on \w+://(\S+)")
                self.address = found["superlink"]
            link = {"address": self.address}
            link |= {"root-certificates": str(tls.ca_cert)} if tls else {"insecure": True}
            config = {"superlink": {"default": _CONNECTION, _CONNECTION: link}}
            _write_toml(self.workdir / "flwr-home" / "config.toml", config)
            self.start_site(*self.node_configs)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started here: the run's client, the sites, then the SuperLink."""
        for key in reversed(list(self._procs)):  # the run, the sites, then the SuperLink
            _stop(self._procs.pop(key))
        home = f"FLWR_HOME={self.workdir}".encode()  # a SuperExec may outlive its parent a bit
        for entry in Path("/proc").glob("[0-9]*"):  # (Linux; elsewhere its watchdog stops it)
            with contextlib.suppress(OSError):
                if any(v.startswith(home) for v in (entry / "environ").read_bytes().split(b"\0")):
                    os.kill(int(entry.name), signal.SIGKILL)

    def submit(self, server_app: str, client_app: str, run_config: Config | None = None) -> int:
        """Submit a run (``flwr run APP medcl --stream``); return its run id, without waiting."""
        app = {
            "project": {"name": "medcl-federation", "version": "1.0.0", "license": "Apache-2.0",
                        "description": "a medcl federated run", "dependencies": []},
            "tool": {"flwr": {"app": {
                "publisher": "medcl",
                "components": {"serverapp": _component(server_app, "server_app"),
                               "clientapp": _component(client_app, "client_app")},
                "config": _check_config("run_config", run_config or {}),
            }}},
        }  # fmt: skip
        self._runs += 1
        app_dir = _write_toml(self.workdir / "apps" / f"run-{self._runs}" / "pyproject.toml", app)
        argv = ["flwr", "run", str(app_dir.parent), _CONNECTION, "--stream"]
        self._run = f"serverapp-{self._runs}"  # its log: the ServerApp's, as --stream prints it
        started = self._start({self._run: (argv, self.workdir / "flwr-home")}, rb"run (\d+)")
        self._run_id = int(started[self._run])
        return self._run_id

    @property
    def running(self) -> bool:
        """Whether the submitted run goes on (its ``flwr run --stream`` has not returned)."""
        return self._run in self._procs and self._procs[self._run].poll() is None

    def _flwr(self, *args: str) -> str:
        env = os.environ | _ENV | {"FLWR_HOME": str(self.workdir / "flwr-home")}
        argv = [str(Path(sys.executable).parent / "flwr"), *args, _CONNECTION]
        return subprocess.run(argv, env=env, capture_output=True, text=True).stdout

    def wait(self) -> RunResult:
        """Wait for the submitted run to end; raise :class:`FederationRunError` unless completed."""
        proc, log = self._procs[self._run], self.workdir / "logs" / f"{self._run}.log"
        try:
            with log.open(errors="replace") as lines:  # printed on stderr unless quiet
                while (line := lines.readline()) or proc.poll() is None:
                    if not line:
                        time.sleep(0.2)
                    elif not self.quiet:
                        sys.stderr.write(line)
        except BaseException:  # Ctrl-C: also stop the run on a SuperLink that outlives us
            self._flwr("stop", str(self._run_id))
            raise
        listed = self._flwr("ls", "--format", "json", "--run-id", str(self._run_id))
        try:
            run = json.loads(listed)["runs"][0]
        except (ValueError, KeyError, IndexError):  # an error message, not JSON
            run = {"status": "unknown", "status-details": listed[-500:]}
        if run["status"] != "finished:completed":
            raise FederationRunError(
                f"Flower run {self._run_id} ended {run['status']} ({run['status-details']}); the "
                f"ServerApp log {log} ends with:\n{_tail(log)}\nAll logs: {self.workdir / 'logs'}."
            )
        return RunResult(self._run_id, run["status"], log)


def run_deployment(
    server_app: str,
    client_app: str,
    *,
    sites: Sequence[SiteNode],
    workdir: Path,
    run_config: Config | None = None,
    superlink: str | None = None,
    tls: TLSFiles | None = None,
    quiet: bool = True,
) -> RunResult:
    """Run the apps on Flower's deployment engine (a :class:`LocalFederation`) to the end.

    Raises:
        ConfigError: bad arguments (nothing started). FederationRunError: a run that failed.
    """
    options = {"superlink": superlink, "tls": tls, "quiet": quiet}
    with LocalFederation(sites=sites, workdir=workdir, **options) as federation:
        federation.submit(server_app, client_app, run_config)
        return federation.wait()


# Flower's simulation engine, in this process ---------------------------------------------------
def run_simulation_engine(
    server_app: str,
    client_app: str,
    *,
    sites: Sequence[SiteNode],
    workdir: Path,
    run_config: Config | None = None,
    quiet: bool = True,
) -> None:
    """Run the apps on Flower's simulation engine (Ray) in this process, a virtual site each.

    The apps see ``node_config`` and ``run_config`` as in :func:`run_deployment`. Ray gets one
    CPU per site (at most the machine's), the smallest object store (75 MiB), no dashboard and,
    if ``quiet``, no log; it is shut down on return, also after an error (raised as it was).
    """
    configs = [_check_config(f"sites[{i}].node_config", s.node_config) for i, s in enumerate(sites)]
    run_cfg = _check_config("run_config", run_config or {})
    init = {"num_cpus": max(1, min(len(sites), os.cpu_count() or 1)), "log_to_driver": not quiet,
            "object_store_memory": 75 * 1024**2, "logging_level": "ERROR" if quiet else "INFO"}  # fmt: skip
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init}
    environ, flwr_logger = dict(os.environ), logging.getLogger("flwr")
    level = flwr_logger.level
    home = {"FLWR_HOME": str(Path(workdir).resolve() / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    os.environ.update(home, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")  # before flwr is imported
    try:
        refs = (_component(server_app, "server_app"), _component(client_app, "client_app"))
        try:
            server_obj, client_obj = map(pkgutil.resolve_name, refs)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"the apps {refs} do not load ({err}); check the names.") from err
        import ray
        from flwr.simulation import run_simulation

        def server(grid: Any, context: Any) -> None:
            context.run_config = dict(run_cfg)
            server_obj(grid=grid, context=context)

        def client(message: Any, context: Any) -> Any:
            saved = context.node_config, context.run_config  # Flower refuses a changed run_config
            site = configs[int(context.node_config["partition-id"])]
            context.node_config, context.run_config = context.node_config | site, run_cfg
            try:
                return client_obj(message=message, context=context)
            finally:
                context.node_config, context.run_config = saved

        flwr_logger.setLevel(logging.ERROR if quiet else level)
        try:
            run_simulation(server, client, len(sites), backend_config=backend)
        finally:
            if ray.is_initialized():
                ray.shutdown()
    finally:  # Flower's Ray backend also rewrites PYTHONPATH
        os.environ.clear()
        os.environ.update(environ)
        flwr_logger.setLevel(level)

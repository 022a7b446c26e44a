"""Flower plumbing of `medcl federate`: real SuperLink/SuperNode processes; the simulation engine.

The apps are the numpy toy of ``tests/flower_toy_app.py``: FedAvg of one array where site ``s``
adds ``delta_s * [1, 2, 3]`` per round, so after ``r`` rounds with every site answering the
array is ``r * mean(delta) * [1, 2, 3]``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
from medcl.errors import ConfigError
from medcl.federated.flower_runtime import (
    FederationRunError,
    LocalFederation,
    SiteNode,
    TLSFiles,
    run_deployment,
    run_simulation_engine,
)

SERVER, CLIENT = "flower_toy_app:server", "flower_toy_app:client"
STEP = np.array([1.0, 2.0, 3.0])
SITES = [SiteNode("a", {"site": "a", "delta": 1.0}), SiteNode("b", {"site": "b", "delta": 3.0})]


def _run_config(out: Path, **extra: object) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = {"num-rounds": 2, "min-nodes": 2, "round-timeout": 60.0, "out-dir": str(out)}
    return {**base, "tag": "from-the-caller", **extra}


def _processes_under(workdir: Path) -> list[int]:
    """Live processes whose FLWR_HOME lies in ``workdir`` (every process a federation starts)."""
    marker = f"FLWR_HOME={workdir.resolve()}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(var.startswith(marker) for var in environ):
            pids.append(int(entry.name))
    return pids


def _tree_hash(root: Path) -> str:
    """Names and contents of every file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _await_file(path: Path, federation: LocalFederation) -> dict:
    """Wait for the toy server to write ``path`` while the run goes on; fail if the run ends."""
    while not path.exists():
        assert federation.running, f"the run ended before writing {path.name}"
        time.sleep(0.2)
    return json.loads(path.read_text())  # written whole (renamed into place)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """One SuperLink and SuperNodes a (delta 1) and b (delta 3) on loopback, for several runs."""
    with LocalFederation(sites=SITES, workdir=tmp_path_factory.mktemp("fed")) as fed:
        yield fed


@pytest.mark.slow
def test_failed_run_raises_with_the_serverapp_log(federation: LocalFederation) -> None:
    federation.submit("flower_toy_app:broken_server", CLIENT, {})
    with pytest.raises(FederationRunError) as failed:
        federation.wait()
    message = str(failed.value)
    assert "finished:failed" in message
    assert "toy server failed on purpose" in message  # the tail of the ServerApp's log


@pytest.mark.parametrize("superlink", ["10.0.0.5:9093", "hospital.example.org:9093"])
def test_non_loopback_without_tls_is_refused_before_anything_starts(
    tmp_path: Path, superlink: str
) -> None:
    workdir = tmp_path / "work"
    before = _tree_hash(tmp_path)
    with pytest.raises(ConfigError) as refused:
        run_deployment(SERVER, CLIENT, sites=SITES, workdir=workdir, superlink=superlink)
    message = str(refused.value)
    assert superlink in message and "tls=None" in message and "TLSFiles" in message
    assert "\n" not in message
    assert not workdir.exists() and _tree_hash(tmp_path) == before
    assert _processes_under(workdir) == []


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'module:attr'.*'flower_toy_app'"):
        run_simulation_engine("flower_toy_app", CLIENT, sites=SITES, workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"values must be str, int, float or bool.*x=\[1\]"):
        LocalFederation(sites=[SiteNode("a", {"x": [1]})], workdir=tmp_path)  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="distinct names"):
        LocalFederation(sites=[SITES[0], SITES[0]], workdir=tmp_path)
    with pytest.raises(ConfigError, match="server_cert"):
        LocalFederation(sites=SITES, workdir=tmp_path, tls=TLSFiles(tmp_path / "ca.pem"))


def _self_signed(folder: Path) -> TLSFiles:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, key, issuer, issuer_key, ca: bool, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    ca = cert("medcl test CA", ca_key, "medcl test CA", ca_key, ca=True)
    server = cert("127.0.0.1", key, "medcl test CA", ca_key, ca=False, san=san)
    pem = serialization.Encoding.PEM
    files = TLSFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(pem))
    files.server_cert.write_bytes(server.public_bytes(pem))
    files.server_key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


@pytest.mark.slow
def test_deployment_with_tls_on_loopback(tmp_path: Path) -> None:
    tls = _self_signed(tmp_path)
    config = _run_config(tmp_path / "out", **{"num-rounds": 1})
    result = run_deployment(
        SERVER, CLIENT, sites=SITES, workdir=tmp_path / "work", run_config=config, tls=tls
    )
    assert result.status == "finished:completed"
    final = json.loads((tmp_path / "out" / "final.json").read_text())
    np.testing.assert_allclose(final["weights"], np.mean([1.0, 3.0]) * STEP)
    superlink_log = (tmp_path / "work" / "logs" / "superlink.log").read_text()
    assert "--insecure" not in superlink_log and "TLS disabled" not in superlink_log


@pytest.mark.slow
def test_simulation_engine_runs_the_same_apps(tmp_path: Path) -> None:
    import ray

    config = _run_config(tmp_path / "out")
    pythonpath = os.environ.get("PYTHONPATH")
    run_simulation_engine(SERVER, CLIENT, sites=SITES, workdir=tmp_path, run_config=config)

    final = json.loads((tmp_path / "out" / "final.json").read_text())
    np.testing.assert_allclose(final["weights"], 2 * np.mean([1.0, 3.0]) * STEP)
    assert final["run_config"] == config
    rounds = [json.loads((tmp_path / "out" / f"round-{r}.json").read_text()) for r in (1, 2)]
    assert [r["sites"] for r in rounds] == [["a", "b"], ["a", "b"]]  # node_config per site
    assert not ray.is_initialized()
    assert os.environ.get("PYTHONPATH") == pythonpath  # Flower's Ray backend edits it

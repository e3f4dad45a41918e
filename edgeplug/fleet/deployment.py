"""Files a Flower deployment of an artifact folder needs: the app folder for `flwr run`, TLS
certificates and SuperNode keys (for loopback trials; a real fleet uses its own PKI), and a
SuperLink connection in Flower's configuration."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeplug.atomic import atomic_directory, write_text
from edgeplug.errors import EdgeplugError
from edgeplug.fleet.apps import FleetSettings

APP_NAME = "edgeplug-fleet"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def run_config(artifacts: Path, settings: FleetSettings, *, test: Path | None = None) -> dict[str, Any]:
    """The app's run config: the keys `edgeplug.fleet.flower_app.server_app` reads."""
    return {"artifacts": str(artifacts.resolve()), "clients": settings.clients, "rounds": settings.rounds, "strategy": settings.strategy,
            "fraction": settings.fraction, "local-epochs": settings.local_epochs, "batch-size": settings.batch_size,
            "lr": settings.lr or 0.0, "timeout": settings.timeout, "min-clients": settings.min_clients or 0,
            "wait": settings.wait, "test": str(test.resolve()) if test else "", "force": False}


def write_app(target: Path, artifacts: Path, settings: FleetSettings, *, test: Path | None = None, force: bool = False) -> Path:
    """Write a Flower App folder (pyproject.toml only) whose components are edgeplug's ServerApp and ClientApp."""
    settings.check()
    if not (artifacts / "report.json").is_file():
        raise EdgeplugError(f"{artifacts} is not an artifact folder written by 'edgeplug rewrite'")
    if test is not None and not test.is_file():
        raise EdgeplugError(f"--test {test}: no such file")
    from importlib.metadata import version

    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in run_config(artifacts, settings, test=test).items())
    text = f"""# A Flower App around an edgeplug artifact folder: `flwr run {target.name} <superlink-connection>`.
# The components live in the installed edgeplug package; every node needs edgeplug[fleet] installed.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "edgeplug fleet training of {artifacts.name} on Flower"
license = "MIT"
dependencies = ["flwr>={version('flwr')}", "edgeplug>={version('edgeplug')}"]

[tool.flwr.app]
publisher = "edgeplug"

[tool.flwr.app.components]
serverapp = "edgeplug.fleet.flower_app:server_app"
clientapp = "edgeplug.fleet.flower_app:client_app"

[tool.flwr.app.config]
{config}
"""
    def ours(folder: Path) -> bool:
        app = folder / "pyproject.toml"
        return app.is_file() and "edgeplug.fleet.flower_app" in app.read_text(encoding="utf-8", errors="replace")

    with atomic_directory(target, overwrite=force, replaceable=ours, replaceable_kind="a Flower App written by edgeplug") as staging:
        (staging / "pyproject.toml").write_text(text, encoding="utf-8")
    return target


def write_flower_config(flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> Path:
    """Add (or replace) SuperLink connection `name` in Flower's configuration under `flwr_home` (FLWR_HOME)."""
    path = flwr_home / "config.toml"
    lines = [f"[superlink.{name}]", f"address = {_toml_value(address)}"]
    lines.append(f"root-certificates = {_toml_value(root_certificates.resolve())}" if root_certificates else "insecure = true")
    text = path.read_text(encoding="utf-8") if path.is_file() else '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    kept, skip = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skip = line.strip() == f"[superlink.{name}]"
        if not skip:
            kept.append(line)
    flwr_home.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(kept).rstrip() + "\n\n" + "\n".join(lines) + "\n")
    return path


def write_credentials(target: Path, *, supernodes: int = 2, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
                      days: int = 30, force: bool = False) -> dict[str, Path]:
    """A CA, a SuperLink certificate for `hosts` and one EC key pair per SuperNode (OpenSSH format).

    For trying TLS and SuperNode authentication on one machine; keys are written without
    passphrase, private files mode 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if supernodes < 0:
        raise EdgeplugError("--supernodes must be 0 or more")
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key: Any, issuer: Any, issuer_key: Any, *, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeplug fleet CA")])
    ca_cert = certificate("edgeplug fleet CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = certificate(hosts[0], server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    files: dict[str, bytes] = {
        "ca.crt": ca_cert.public_bytes(pem),
        "server.pem": server_cert.public_bytes(pem),
        "server.key": server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for number in range(1, supernodes + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"supernode_{number}"] = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        files[f"supernode_{number}.pub"] = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with atomic_directory(target, overwrite=force, replaceable=lambda folder: (folder / "ca.crt").is_file(),
                          replaceable_kind="a credentials folder written by edgeplug") as staging:
        for name, data in files.items():
            path = staging / name
            path.write_bytes(data)
            if name.endswith(".key") or (name.startswith("supernode_") and not name.endswith(".pub")):
                path.chmod(0o600)
    return {name: target / name for name in files}


def describe(paths: Mapping[str, Path]) -> str:
    return ", ".join(sorted(paths))

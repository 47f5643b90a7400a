"""kdfl on Flower's deployment engine with TLS and SuperNode authentication, on loopback.

The test makes a CA, a server certificate for 127.0.0.1 and SuperNode key pairs (with
``cryptography``), starts a SuperLink with TLS and ``--enable-supernode-auth``, registers
two SuperNodes' public keys (``flwr supernode register``), starts them with
``--root-certificates`` and their private keys, runs one round of a two-client kdfl
federation and checks that a SuperNode whose key was not registered is turned away.
Every process started here is stopped by process id (tests/flower/deploy.py)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
crypto = pytest.importorskip("cryptography")

from deploy import APP, LOGS, Deployment  # noqa: E402

TIMEOUT_S = 240.0
SETS = "run.rounds=1; data.num_clients=2; attack.name='none'; attack.fraction=0.0; local.epochs=1"


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kdfl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.crt", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def make_node_key(d: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what Flower reads): (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


def test_tls_and_supernode_authentication_on_loopback(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = make_certs(certs)
    node_keys = [make_node_key(certs, f"node{i}") for i in range(2)]
    intruder_key, _ = make_node_key(certs, "intruder")  # never registered
    with Deployment(tmp_path, "kdfl-tls", TIMEOUT_S, root_certificates=ca, logs=(*LOGS, "intruder")) as d:
        d.superlink("--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                    "--enable-supernode-auth")
        for i, (_, pub) in enumerate(node_keys):  # over TLS: the CLI verifies the server against the CA
            reg = d.flwr("supernode", "register", str(pub), "kdfl-tls")
            assert reg.returncode == 0, f"registering node {i} failed:\n{reg.stdout}\n{reg.stderr}"
        d.supernode("intruder", 1, 2, "--auth-supernode-private-key", str(intruder_key))
        for i, (priv, _) in enumerate(node_keys):
            d.supernode(f"supernode{i}", i, 2, "--auth-supernode-private-key", str(priv))
        d.wait_summary(d.flwr_run(APP, "--run-config", f"kdfl-out='{d.out}' kdfl-wait-s=120 kdfl-set=\"{SETS}\""))
        refused = "Failed to activate SuperNode"  # the SuperLink's answer (ApiError 2004, HTTP 412)
        while refused not in d.log("intruder") and time.monotonic() < d.deadline:
            time.sleep(0.5)
        intruder_log = d.log("intruder")
        superlink_log = d.log("superlink")

    out = d.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1] and records[0]["failed"] == [] and records[0]["clients"] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] > 0.1
    # the SuperNode with an unknown key was refused by the SuperLink (it also claimed
    # partition-id=1: had it joined, the ServerApp's setup would have failed on two claims)
    assert refused in intruder_log and "Exit Code: 305" in intruder_log, intruder_log[-2000:]
    assert "[/v1/fleet/activate-node][ApiError:2004]" in superlink_log
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id") == 2

"""`ebpflb certs`: the CA and the certificates it issues: subjects, SANs, purposes, files."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ebpflb import certs, cli

pytestmark = pytest.mark.unit


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    certs.init_ca(d)
    return d


def test_init_makes_a_p256_ca_in_a_private_folder(ca_dir: Path) -> None:
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir / "ca.crt") == 0o644
    ca = load(ca_dir / "ca.crt")
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert ca.issuer == ca.subject
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert "(a CA)" in certs.describe(ca_dir / "ca.crt")


@pytest.mark.parametrize(
    ("role", "name", "node", "subject"),
    [
        ("admin", "alice", "", "CN=alice,OU=admin,O=ebpflb"),
        ("viewer", "grafana", "", "CN=grafana,OU=viewer,O=ebpflb"),
        ("node", "node1", "", "CN=system:node:node1,OU=node,O=ebpflb"),
        ("node", "agent-a", "worker-7", "CN=system:node:worker-7,OU=node,O=ebpflb"),
    ],
)
def test_client_certificates_carry_role_and_node(
    ca_dir: Path, role: str, name: str, node: str, subject: str
) -> None:
    issued = certs.issue(ca_dir, name, role, node=node)
    assert issued.cert == ca_dir / f"{name}.crt" and issued.key == ca_dir / f"{name}.key"
    assert mode(issued.key) == 0o600
    cert = load(issued.cert)
    assert cert.subject.rfc4514_string() == subject
    assert cert.issuer == load(ca_dir / "ca.crt").subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    h = certs.holder(cert)
    assert (h.role, h.node) == (role, (node or name) if role == "node" else "")
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == certs.LEAF_DAYS
    # Backdated a little for clocks behind ours, never in the future.
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)


def test_server_certificate_names_the_addresses_clients_dial(ca_dir: Path) -> None:
    issued = certs.issue(
        ca_dir, "registry", "server", ips=["192.168.56.10", "127.0.0.1"], dns=["control"]
    )
    cert = load(issued.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.56.10"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["control"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "server"
    )
    line = certs.describe(issued.cert)
    assert '(server "registry")' in line and "192.168.56.10, 127.0.0.1, control" in line


def test_not_before_and_days_make_an_expired_certificate(ca_dir: Path) -> None:
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = load(certs.issue(ca_dir, "old", "viewer", not_before=start, days=30).cert)
    assert cert.not_valid_after_utc == start + datetime.timedelta(days=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "x", "role": "root"}, 'invalid role "root"'),
        ({"name": "../etc", "role": "admin"}, 'invalid name "../etc"'),
        ({"name": "ca", "role": "admin"}, 'invalid name "ca"'),
        ({"name": "x", "role": "server"}, "a server certificate needs the addresses"),
        ({"name": "x", "role": "admin", "node": "n1"}, "--node is for the node role only"),
        ({"name": "x", "role": "node", "node": "Node_1"}, 'invalid node name "Node_1"'),
        ({"name": "x", "role": "server", "ips": ["300.1.1.1"]}, '--ip: invalid IP address "300'),
    ],
)
def test_bad_requests_are_refused(ca_dir: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(certs.CertError, match=message.replace("(", r"\(")):
        certs.issue(ca_dir, **kwargs)  # type: ignore[arg-type]
    assert not (ca_dir / "x.crt").exists() and not (ca_dir / "x.key").exists()


def test_files_are_not_replaced_without_force(ca_dir: Path) -> None:
    first = load(certs.issue(ca_dir, "a", "admin").cert)
    with pytest.raises(certs.CertError, match=r"a.crt exists \(give --force"):
        certs.issue(ca_dir, "a", "admin")
    with pytest.raises(certs.CertError, match=r"ca.crt exists"):
        certs.init_ca(ca_dir)
    second = load(certs.issue(ca_dir, "a", "viewer", force=True).cert)
    assert second.serial_number != first.serial_number
    assert certs.holder(second).role == "viewer"
    assert mode(ca_dir / "a.key") == 0o600
    assert sorted(p.name for p in ca_dir.iterdir()) == ["a.crt", "a.key", "ca.crt", "ca.key"]


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match=r"no such file \(make the CA first: ebpflb certs"):
        certs.issue(tmp_path, "a", "admin")


def test_holder_of_certificates_that_are_not_ours(ca_dir: Path) -> None:
    ca = load(ca_dir / "ca.crt")
    assert certs.holder(ca).role == ""  # O=ebpflb but no OU
    node = load(certs.issue(ca_dir, "n", "node").cert)
    assert certs.holder(node) == certs.Holder("node", "system:node:n", "n")
    with pytest.raises(certs.CertError, match="unreadable certificate"):
        certs.holder_of_pem(b"not a certificate")


def test_cli_role_list_and_days_match_the_module() -> None:
    assert cli.CERT_ROLES == certs.ROLES
    assert (cli.CA_DAYS, cli.CERT_DAYS) == (certs.CA_DAYS, certs.LEAF_DAYS)


def test_cli_certs_init_issue_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert cli.main(["certs", "init", "--dir", d]) == 0
    argv = ["certs", "issue", "--dir", d, "--name", "registry", "--role", "server"]
    assert cli.main([*argv, "--ip", "127.0.0.1", "--dns", "localhost"]) == 0
    assert cli.main(["certs", "issue", "--dir", d, "--name", "n1", "--role", "node"]) == 0
    out = capsys.readouterr().out
    assert f"{d}/ca.crt: CN=ebpflb CA,O=ebpflb (a CA)" in out
    assert f"{d}/registry.key: its key (mode 0600)" in out
    assert f'{d}/n1.crt: CN=system:node:n1,OU=node,O=ebpflb (node "n1")' in out
    assert cli.main(["certs", "show", f"{d}/n1.crt"]) == 0
    assert capsys.readouterr().out.startswith(f"{d}/n1.crt: CN=system:node:n1")
    assert cli.main(["certs", "issue", "--dir", d, "--name", "n1", "--role", "node"]) == 1
    assert capsys.readouterr().err == f"error: {d}/n1.crt exists (give --force to replace it)\n"
    assert cli.main(["certs", "issue", "--dir", d, "--name", "x", "--role", "root"]) == 1
    assert "argument --role: invalid choice: 'root'" in capsys.readouterr().err

"""A small certificate authority for the registry's mTLS: the CA, server and client certificates.

Every key is ECDSA P-256. A client certificate says who its holder is in its subject:

    O=ebpflb, OU=<role>, CN=<name>                  role admin or viewer
    O=ebpflb, OU=node,   CN=system:node:<node>      role node, for the Node named <node>

(the node's CN is the one Kubernetes gives kubelets). A server certificate has
OU=server and the registry's addresses as subjectAltNames, which clients check.
Files in the folder: ca.crt and ca.key, then NAME.crt and NAME.key per certificate;
keys are written mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "ebpflb"
CLIENT_ROLES = ("admin", "node", "viewer")
SERVER_ROLE = "server"
ROLES = (*CLIENT_ROLES, SERVER_ROLE)
NODE_CN_PREFIX = "system:node:"
CA_NAME = "ca"
CA_DAYS = 10 * 365
LEAF_DAYS = 365
# Certificates start a few minutes in the past, so a peer whose clock is a little
# behind does not refuse a certificate made just now.
BACKDATE = datetime.timedelta(minutes=5)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_NODE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class CertError(Exception):
    """A certificate that cannot be made or read (the message says why)."""


@dataclass(frozen=True)
class Issued:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Holder:
    """Who a client certificate names: its role, its common name, and for a node its node."""

    role: str  # admin | node | viewer | server | "" (not one of ours)
    name: str  # the subject's CN
    node: str = ""  # role node: the Node it is

    def __str__(self) -> str:
        return f'{self.role or "unknown role"} "{self.node or self.name}"'


def cert_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.crt"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write a file with mode from the start (never readable by others, even briefly);
    an existing file is an error unless force, and then replaced atomically."""
    if path.exists() and not force:
        raise CertError(f"{path} exists (give --force to replace it)")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_pair(
    directory: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    force: bool,
) -> Issued:
    issued = Issued(cert_path(directory, name), key_path(directory, name))
    for path in (issued.cert, issued.key):
        if path.exists() and not force:
            raise CertError(f"{path} exists (give --force to replace it)")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(issued.key, key_pem, 0o600, force)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return issued


def _make_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    elif not directory.is_dir():
        raise CertError(f"{directory} is not a folder")


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signing (ECDSA handshakes) for every certificate; signing certificates and CRLs
    for the CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(
    directory: Path,
    *,
    common_name: str = "ebpflb CA",
    days: int = CA_DAYS,
    force: bool = False,
) -> Issued:
    """Make a CA (ca.crt, ca.key) in directory, which is created mode 0700 if missing."""
    _make_dir(directory)
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start = _now() - BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, CA_NAME, cert, key, force)


def subject(role: str, name: str, node: str = "") -> x509.Name:
    """The subject a certificate of role gets: O=ebpflb, OU=role, CN=name (or
    CN=system:node:NODE for a node)."""
    cn = NODE_CN_PREFIX + node if role == "node" else name
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_file, key_file = cert_path(directory, CA_NAME), key_path(directory, CA_NAME)
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise CertError(
            f"{e.filename}: no such file (make the CA first: ebpflb certs init)"
        ) from None
    except (OSError, ValueError, TypeError) as e:
        raise CertError(f"{directory}: cannot read the CA: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_file}: not an ECDSA key")
    return cert, key


def issue(
    directory: Path,
    name: str,
    role: str,
    *,
    node: str = "",
    ips: Sequence[str] = (),
    dns: Sequence[str] = (),
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
    force: bool = False,
) -> Issued:
    """Issue NAME.crt and NAME.key in directory, signed by its CA.

    role is admin, node or viewer for a client, server for the registry (which
    needs at least one of ips and dns: the addresses clients dial). For a node,
    node is its Node's name (default: name). not_before backdates the certificate
    (days still count from it): tests use it to make expired ones."""
    if not _NAME.match(name) or name == CA_NAME:
        raise CertError(
            f'invalid name "{name}": lower-case letters, digits, ".", "_" and "-" '
            f'(it names the files), and not "{CA_NAME}"'
        )
    if role not in ROLES:
        raise CertError(f'invalid role "{role}": one of {", ".join(ROLES)}')
    if role == "node":
        node = node or name
        if not _NODE.match(node):
            raise CertError(f'invalid node name "{node}": a DNS subdomain (a-z, 0-9, ".", "-")')
    elif node:
        raise CertError("--node is for the node role only")
    if role == SERVER_ROLE and not (ips or dns):
        raise CertError("a server certificate needs the addresses clients dial: --ip or --dns")
    sans: list[x509.GeneralName] = []
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(f'--ip: invalid IP address "{ip}"') from None
    sans += [x509.DNSName(d) for d in dns]
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    start = not_before or (_now() - BACKDATE)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == SERVER_ROLE else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject(role, name, node))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write_pair(directory, name, cert, key, force)


def holder(cert: x509.Certificate) -> Holder:
    """The role and names a certificate's subject gives (role "" when it is not ours)."""

    def one(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        if len(values) != 1:
            return ""
        v = values[0].value
        return v if isinstance(v, str) else v.decode()

    cn = one(NameOID.COMMON_NAME)
    role = one(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if one(NameOID.ORGANIZATION_NAME) != ORGANIZATION or role not in ROLES:
        return Holder("", cn)
    if role == "node":
        if not cn.startswith(NODE_CN_PREFIX) or not cn[len(NODE_CN_PREFIX) :]:
            return Holder("", cn)
        return Holder(role, cn, cn[len(NODE_CN_PREFIX) :])
    return Holder(role, cn)


def holder_of_pem(pem: bytes) -> Holder:
    try:
        return holder(x509.load_pem_x509_certificate(pem))
    except ValueError as e:
        raise CertError(f"unreadable certificate: {e}") from None


def describe(path: Path) -> str:
    """One line about a certificate file: its holder, validity and addresses."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CertError(f"{path}: {e}") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    who = "a CA" if is_ca else str(holder(cert))
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addrs = [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
        addrs += sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        addrs = []
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    where = f", addresses {', '.join(addrs)}" if addrs else ""
    return f"{path}: {cert.subject.rfc4514_string()} ({who}), valid until {until}{where}"

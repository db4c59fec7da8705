"""Key material of a secure deployment, and checks naming a bad file.

A CA, the SuperLink's TLS certificate and one key pair per SuperNode, made
with the ``cryptography`` library (Flower depends on it). The SuperLink
serves TLS with a certificate signed by the consortium's CA; each SuperNode
checks it against ``ca.crt`` (``--root-certificates``) and proves who it is
with its own EC key (``--auth-supernode-private-key``), whose public half the
SuperLink's operator registers (``flwr supernode register``): Flower 1.42
refuses every SuperNode whose key was not registered when
``--enable-supernode-auth`` is on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from persistence.errors import InputError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
# The names the SuperLink is reached by: the compose service, this machine.
DEFAULT_NAMES = ("superlink", "localhost", "127.0.0.1")
DEFAULT_DAYS = 365
# NIST P-384: an approved curve for Flower's SuperNode keys.
CURVE = ec.SECP384R1


class CredentialError(InputError):
    """A key or certificate file that is missing, expired or does not match."""


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's key pair: the private key file and its ``.pub``."""

    private: Path
    public: Path


def node_keys(folder: Path, index: int) -> NodeKeys:
    """Return the files of SuperNode ``index``'s key pair in ``folder``."""
    private = folder / f"supernode-{index}"
    return NodeKeys(private, private.with_name(private.name + ".pub"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Write a file whole; a secret is readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if secret:
        os.chmod(tmp, 0o600)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpneumo consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_keys(
    out: Path,
    nodes: int,
    *,
    names: Sequence[str] = DEFAULT_NAMES,
    days: int = DEFAULT_DAYS,
) -> list[Path]:
    """Write a CA, the SuperLink's certificate and ``nodes`` SuperNode key pairs.

    Refuses to overwrite key material already in ``out``. Returns the files.
    """
    if nodes < 1:
        raise InputError(f"--nodes {nodes}: a federation needs at least 1 SuperNode")
    if days < 1:
        raise InputError(f"--days {days}: certificates must be valid at least a day")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        p.name for p in out.iterdir() if p.name in (CA_KEY, SERVER_KEY, CA_CERT)
    )
    if existing:
        raise InputError(
            f"{out} already holds {', '.join(existing)}; choose an empty folder (a "
            "new CA would not match the certificates and keys already deployed)"
        )
    now = _now()
    ca_key = ec.generate_private_key(CURVE())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpneumo CA"))
        .issuer_name(_name("fedpneumo CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_subject_alt_names(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    written = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    _write(out / CA_CERT, ca.public_bytes(serialization.Encoding.PEM))
    _write(out / CA_KEY, _pem_key(ca_key), secret=True)
    _write(out / SERVER_CERT, server.public_bytes(serialization.Encoding.PEM))
    _write(out / SERVER_KEY, _pem_key(server_key), secret=True)
    for index in range(nodes):
        written += add_node_key(out, index)
    return written


def add_node_key(out: Path, index: int) -> list[Path]:
    """Write one SuperNode's OpenSSH key pair (for a hospital joining later too)."""
    keys = node_keys(out, index)
    if keys.private.exists():
        raise InputError(f"{keys.private} exists; a node's key is never replaced")
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(keys.private, private, secret=True)
    _write(keys.public, public + f" supernode-{index}\n".encode())
    return [keys.private, keys.public]


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CredentialError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{path} is not a PEM certificate ({exc})") from None


def check_certificate(path: Path, ca_path: Path) -> x509.Certificate:
    """Check a certificate is current and signed by the CA; name the bad file.

    Raises:
        CredentialError: missing or unreadable file, expired or not yet valid,
            or not issued by the CA in ``ca_path``.
    """
    cert = _load_certificate(path)
    ca = _load_certificate(ca_path)
    now = _now()
    if cert.not_valid_after_utc < now:
        raise CredentialError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make "
            "new key material with `fedpneumo deploy keys`"
        )
    if cert.not_valid_before_utc > now:
        raise CredentialError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC (check this machine's clock)"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialError(
            f"{path} was not issued by the CA in {ca_path}: the certificate and the "
            "CA come from different `fedpneumo deploy keys` runs"
        ) from None
    return cert


def check_private_key(path: Path) -> None:
    """Check a SuperNode's private key loads and is on an approved EC curve."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CredentialError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(
            f"{path} is not an OpenSSH private key ({exc}); SuperNode keys come "
            "from `fedpneumo deploy keys`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{path} is not an EC key; Flower needs an EC key")

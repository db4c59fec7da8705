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
import re
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
MAX_DAYS = 3650
DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
# NIST P-384: an approved curve for Flower's SuperNode keys.
CURVE = ec.SECP384R1
NIST = ("secp256r1", "secp384r1", "secp521r1")


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
    """Write a new file whole; a secret is readable by its owner only, from birth."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
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
    """The SuperLink certificate's names; a bad one is an input error."""
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not DNS_NAME.fullmatch(name):
            raise InputError(
                f"--name {name!r} is not a host name or IP address (letters, digits, "
                "'-' and '.', such as superlink.example.org)"
            )
        entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _writable_folder(folder: Path, option: str) -> None:
    """Create a folder for key material, or say in one line why it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"{option} {folder} cannot be created ({exc.strerror}); give a folder "
            "you can write to"
        ) from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"{option} {folder} is not writable; give another folder")


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
    if not 1 <= days <= MAX_DAYS:
        raise InputError(f"--days {days}: give 1 to {MAX_DAYS} days")
    san = _subject_alt_names(names)
    _writable_folder(out, "--out")
    files = {CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY}
    for index in range(nodes):
        keys = node_keys(out, index)
        files |= {keys.private.name, keys.public.name}
    existing = sorted(p.name for p in out.iterdir() if p.name in files)
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
        .add_extension(san, critical=False)
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
    if not out.is_dir():
        raise InputError(f"--keys {out} is not a folder of key material")
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
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST:
        raise CredentialError(
            f"{path} is not an EC key on a NIST curve (P-256, P-384 or P-521), which "
            "Flower requires"
        )


def check_public_key(path: Path) -> None:
    """Check a SuperNode's public key (OpenSSH, a NIST EC curve); name the file."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise CredentialError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{path} is not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST:
        raise CredentialError(
            f"{path} is not an EC key on a NIST curve (P-256, P-384 or P-521), which "
            "Flower requires"
        )


def check_key_pair(cert_path: Path, key_path: Path) -> None:
    """Check that a private key belongs to a certificate; name the key file."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except FileNotFoundError:
        raise CredentialError(f"{key_path} does not exist") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(f"{key_path} is not a PEM private key ({exc})") from None
    cert = _load_certificate(cert_path)
    if key.public_key() != cert.public_key():
        raise CredentialError(
            f"{key_path} is not the private key of {cert_path}: they come from "
            "different `fedpneumo deploy keys` runs"
        )

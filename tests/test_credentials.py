"""Key material of the secure deployment, and the one-line checks that name a file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpneumo.credentials import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    add_node_key,
    make_keys,
)
from tests.conftest import cli


def check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    return cli(monkeypatch, capsys, "deploy", "check", *args)


def test_keys_make_a_ca_a_superlink_certificate_and_node_key_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    code, out, _ = cli(
        monkeypatch, capsys, "deploy", "keys", "--out", str(keys), "--nodes", "2"
    )
    assert code == 0
    names = sorted(p.name for p in keys.iterdir())
    assert names == sorted(
        [
            "ca.crt",
            "ca.key",
            "superlink.crt",
            "superlink.key",
            "supernode-0",
            "supernode-0.pub",
            "supernode-1",
            "supernode-1.pub",
        ]
    )
    # Secrets are readable by their owner only.
    for secret in ("ca.key", "superlink.key", "supernode-0", "supernode-1"):
        assert (keys / secret).stat().st_mode & 0o077 == 0, secret
    cert = x509.load_pem_x509_certificate((keys / SERVER_CERT).read_bytes())
    names_in_cert = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert set(names_in_cert.get_values_for_type(x509.DNSName)) == {
        "superlink",
        "localhost",
    }
    assert [str(ip) for ip in names_in_cert.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]
    public = (keys / "supernode-0.pub").read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ")  # Flower wants a NIST EC key
    assert check(monkeypatch, capsys, "--keys", str(keys), "--node", "1")[0] == 0
    # A second run never replaces a deployed CA.
    code, _, err = cli(
        monkeypatch, capsys, "deploy", "keys", "--out", str(keys), "--nodes", "1"
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {keys} already holds ca.crt, ca.key, superlink.crt, superlink.key, "
        "supernode-0, supernode-0.pub; choose an empty folder (a new CA would not "
        "match the certificates and keys already deployed)"
    ]
    assert add_node_key(keys, 2)[0].name == "supernode-2"


def expired_certificate(keys: Path) -> bytes:
    """A SuperLink certificate from the deployment's own CA that expired."""
    ca_key = serialization.load_pem_private_key((keys / CA_KEY).read_bytes(), None)
    ca = x509.load_pem_x509_certificate((keys / CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_an_expired_or_foreign_certificate_or_bad_key_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_keys(keys, 1)
    make_keys(other, 1)
    cert = keys / SERVER_CERT
    cases = {
        "expired": (
            lambda: cert.write_bytes(expired_certificate(keys)),
            f"error: {cert} expired on ",
        ),
        "another CA": (
            lambda: cert.write_bytes((other / SERVER_CERT).read_bytes()),
            f"error: {cert} was not issued by the CA in {keys / CA_CERT}: the "
            "certificate and the CA come from different `fedpneumo deploy keys` runs",
        ),
        "not a certificate": (
            lambda: cert.write_text("hello"),
            f"error: {cert} is not a PEM certificate",
        ),
        "node key missing": (
            lambda: (keys / "supernode-0").unlink(),
            f"error: {keys / 'supernode-0'} does not exist",
        ),
    }
    original = cert.read_bytes()
    for name, (damage, message) in cases.items():
        damage()
        code, _, err = check(monkeypatch, capsys, "--keys", str(keys), "--node", "0")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (name, err)
        assert lines[0].startswith(message), (name, lines[0])
        cert.write_bytes(original)


def test_deploy_commands_need_keys_or_the_named_insecure_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--index", "0", "--superlink", "127.0.0.1:1", "--node-config", "a=1"]
    code, _, err = cli(monkeypatch, capsys, "deploy", "supernode", *args)
    assert code == 2
    assert err.strip().splitlines() == [
        "error: give --keys DIR (TLS and SuperNode authentication) or, for a local "
        "experiment only, --insecure-local-only"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["keys", "--out", "{file}", "--nodes", "1"],
            "error: --out {file} is a file; give a folder",
        ),
        (
            ["keys", "--out", "{tmp}/k", "--nodes", "1", "--name", "bad name"],
            "error: --name 'bad name' is not a host name or IP address (letters, "
            "digits, '-' and '.', such as superlink.example.org)",
        ),
        (
            ["keys", "--out", "{tmp}/k", "--nodes", "1", "--days", "100000000"],
            "error: --days 100000000: give 1 to 3650 days",
        ),
        (
            ["add-node", "--keys", "{tmp}/missing", "--index", "3"],
            "error: --keys {tmp}/missing is not a folder of key material",
        ),
        (
            [
                "register",
                "--keys",
                "{tmp}",
                "--superlink",
                "127.0.0.1:1",
                "--nodes",
                "1",
            ],
            "error: {tmp}/ca.crt does not exist",
        ),
    ],
    ids=["out-is-a-file", "bad-name", "huge-days", "add-to-nothing", "no-ca"],
)
def test_bad_deploy_input_is_one_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("x")
    subst = {"{file}": str(tmp_path / "file"), "{tmp}": str(tmp_path)}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    code, _, err = cli(monkeypatch, capsys, "deploy", *map(fill, args))
    assert code == 2, err
    assert err.strip().splitlines() == [fill(message)]
    assert not (tmp_path / "k").exists()


def test_a_superlink_key_of_another_certificate_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_keys(keys, 1)
    make_keys(other, 1)
    (keys / "superlink.key").write_bytes((other / "superlink.key").read_bytes())
    code, _, err = check(monkeypatch, capsys, "--keys", str(keys))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {keys / 'superlink.key'} is not the private key of "
        f"{keys / 'superlink.crt'}: they come from different `fedpneumo deploy keys` "
        "runs"
    ]

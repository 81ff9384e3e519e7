"""TLS and mutual TLS from settings, on a real server with certificates made for the test (a CA, a server
certificate for 127.0.0.1, a client certificate): plaintext clients are refused, a client that trusts the CA gets
in; with tls_client_ca, only a client showing a certificate signed by that CA does. Bad settings fail at start."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cl_service.api.server import server_in_thread, start_server
from cl_service.cli import main
from cl_service.client import Client, Tls
from cl_service.config import Settings, load_settings
from replay_store.tokens import create_token

pytestmark = pytest.mark.integration


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key, stranger_key = _key(), _key(), _key(), _key()
    ca = _certificate("test CA", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    stranger_ca = _certificate("another CA", stranger_key, None, ca=True)
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": _certificate("cl-service", server_key, issuer, ca=False).public_bytes(
            serialization.Encoding.PEM
        ),
        "server_key": _pem_key(server_key),
        "client_cert": _certificate("olga", client_key, issuer, ca=False).public_bytes(serialization.Encoding.PEM),
        "client_key": _pem_key(client_key),
        "stranger_cert": _certificate(
            "mallory", client_key, (stranger_ca.subject, stranger_key), ca=False
        ).public_bytes(serialization.Encoding.PEM),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _status_code(target: str, tls: Tls | None) -> grpc.StatusCode:
    with Client(target, timeout_s=10, tls=tls) as client:
        try:
            client.status()
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_tls_refuses_plaintext_and_serves_clients_that_trust_the_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data", bind="127.0.0.1:0", tls_cert=pki["server_cert"], tls_key=pki["server_key"]
    )
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        assert _status_code(target, Tls.from_files(pki["ca"])) == grpc.StatusCode.OK
        assert _status_code(target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext against TLS
        wrong_ca = Tls(pki["stranger_cert"].read_bytes())  # trusts someone else: the server's certificate fails
        assert _status_code(target, wrong_ca) == grpc.StatusCode.UNAVAILABLE


def _mutual_tls(tmp_path: Path, pki: dict[str, Path], **extra: object) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        bind="127.0.0.1:0",
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
        **extra,
    )


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    with server_in_thread(_mutual_tls(tmp_path, pki)) as running:
        target = f"127.0.0.1:{running.port}"
        with_cert = Tls.from_files(pki["ca"], pki["client_cert"], pki["client_key"])
        assert _status_code(target, with_cert) == grpc.StatusCode.OK
        assert _status_code(target, Tls.from_files(pki["ca"])) == grpc.StatusCode.UNAVAILABLE
        stranger = Tls.from_files(pki["ca"], pki["stranger_cert"], pki["client_key"])
        assert _status_code(target, stranger) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert": "server_cert"}, "TLS needs both tls_cert and tls_key"),
        ({"tls_client_ca": "ca"}, "tls_client_ca needs tls_cert and tls_key"),
        ({"tls_cert": "server_cert", "tls_key": "missing"}, "tls_key .* cannot be read"),
        ({"tls_cert": "server_cert", "tls_key": "not_pem"}, "tls_key .* is not a PEM file"),
    ],
)
def test_bad_tls_settings_fail_at_start_with_the_reason(
    tmp_path: Path, pki: dict[str, Path], files: dict[str, str], message: str
) -> None:
    (tmp_path / "not_pem.pem").write_text("hello")
    paths = {**pki, "missing": tmp_path / "missing.pem", "not_pem": tmp_path / "not_pem.pem"}
    settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", **{k: paths[v] for k, v in files.items()})
    with pytest.raises(RuntimeError, match=message):
        asyncio.run(start_server(settings))


def test_the_client_commands_reach_a_server_with_mutual_tls_and_tokens(
    tmp_path: Path, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with server_in_thread(_mutual_tls(tmp_path, pki, auth=True)) as running:
        _, secret = create_token(running.core.store, "line-7", "admin", "test")
        target = ["--target", f"127.0.0.1:{running.port}"]
        tls = ["--ca", str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key", str(pki["client_key"])]
        reach = [*target, *tls, "--token", secret]
        assert main(["status", *reach]) == 0
        assert main(["models", *reach]) == 0
        assert main(["simulate", *reach, "--count", "3", "--size", "32"]) == 0
        assert running.core.store.counts().samples == 3
        capsys.readouterr()
        assert main(["status", *target, *tls]) == 1  # no token
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["status", *target, "--ca", str(pki["ca"]), "--token", secret]) == 1  # no client certificate
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert main(["status", *target, "--ca", str(pki["ca"]), "--cert", str(pki["client_cert"])]) == 2
        assert "--cert and --key go together" in capsys.readouterr().err

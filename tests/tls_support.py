"""Throwaway certificate authorities for the TLS tests, made with trustme."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

#: The names a gateway on loopback is reached by: chat-client checks the one it was given.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


class Certificates:
    """A CA of the test's own, and the files a gateway is given (``cert.pem``,
    ``key.pem``) and a client trusts (``ca.pem``), in ``directory``."""

    def __init__(self, directory: Path, ca: trustme.CA | None = None) -> None:
        self.directory = directory
        self.ca = ca or trustme.CA()
        self.cert_file = directory / "cert.pem"
        self.key_file = directory / "key.pem"
        self.ca_file = directory / "ca.pem"
        directory.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, *names: str, common_name: str = "gateway") -> trustme.LeafCert:
        """A certificate for ``names`` (loopback's by default), written over the gateway's
        files; ``common_name`` tells one issued certificate from another."""
        cert = self.ca.issue_cert(*(names or LOOPBACK_NAMES), common_name=common_name)
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        self.key_file.write_bytes(cert.private_key_pem.bytes())
        return cert

    def gateway_args(self) -> tuple[str, ...]:
        """chat-gateway's TLS flags: any free TLS port, these files."""
        return ("--tls-port", "0", "--tls-cert", str(self.cert_file),
                "--tls-key", str(self.key_file))  # fmt: skip

    def client_context(self) -> ssl.SSLContext:
        """What a careful client uses: this CA trusted, host names checked."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def common_name(peercert: dict[str, object] | None) -> str:
    """The subject's common name in ``getpeercert()``'s form."""
    assert peercert, "no certificate from the peer"
    subject = peercert["subject"]
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise AssertionError(f"no commonName in {subject}")

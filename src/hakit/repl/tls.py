"""TLS for the replication channel, keyed by the cluster key alone.

Both nodes derive the same Ed25519 key pair from the cluster key (HKDF-SHA256, a fixed label)
and the same self-signed certificate (Ed25519 signatures are deterministic, so the certificate
is byte-identical on both nodes). Each side presents it and accepts only a peer presenting it:
mutual authentication means "the peer knows the cluster key"; encryption is TLS 1.3 (AES-GCM or
ChaCha20-Poly1305, chosen by OpenSSL). No file has to be distributed besides the cluster key.

Caveats: whoever holds the cluster key can impersonate a node — as for the heartbeats, the key
is the cluster's one secret. The certificate is valid 2000–2100 so clocks do not matter.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

_LABEL = b"hakit replication tls v1"
SERVER_NAME = "hakit-replication"


def derive_identity(cluster_key: bytes) -> tuple[bytes, bytes]:
    """``(certificate PEM, private key PEM)``, the same for every node of the cluster."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(cluster_key)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def contexts(cluster_key: bytes, scratch: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(server context, client context)`` for the replication channel.

    ``scratch`` is a private directory (the agent's run dir) where the key is written briefly
    with mode 0600 for OpenSSL to load, then removed.
    """
    cert_pem, key_pem = derive_identity(cluster_key)
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".repl-tls-", dir=scratch)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key_pem + cert_pem)
        os.close(fd)
        server = _context(ssl.PROTOCOL_TLS_SERVER, name, cert_pem)
        client = _context(ssl.PROTOCOL_TLS_CLIENT, name, cert_pem)
    finally:
        Path(name).unlink(missing_ok=True)
    return server, client


def _context(protocol: int, pem_file: str, cert_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pem_file)
    ctx.load_verify_locations(cadata=cert_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # the peer is identified by the pinned certificate, not a name
    return ctx

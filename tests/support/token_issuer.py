"""A small token issuer for the registry's Bearer flow (the registry trusts its certificate).

It answers ``GET /token?service=..&scope=repository:NAME:pull`` for ``alice:s3cret`` (Basic) with
an ES256 JWT carrying an ``x5c`` header, the form the distribution registry verifies against its
``rootcertbundle``; anyone else gets a 401.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

SERVICE = "tensord-test-registry"
ISSUER = "tensord-test-issuer"
USER = ("alice", "s3cret")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Issuer:
    url: str
    cert_path: Path
    issued: list[str]


@contextmanager
def token_issuer(tmp: Path) -> Iterator[Issuer]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp / "issuer.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    issued: list[str] = []

    def token(scope: str, subject: str) -> str:
        access = []
        if scope.startswith("repository:"):
            _, repo, actions = scope.split(":", 2)
            access.append({"type": "repository", "name": repo, "actions": actions.split(",")})
        t = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [x5c]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": t + 300,
            "nbf": t - 10,
            "iat": t,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            want = "Basic " + base64.b64encode(":".join(USER).encode()).decode()
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.end_headers()
                return
            query = parse_qs(urlsplit(self.path).query)
            scope = query.get("scope", [""])[0]
            issued.append(scope)
            body = json.dumps({"token": token(scope, USER[0]), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Issuer(f"http://127.0.0.1:{server.server_address[1]}/token", cert_path, issued)
    finally:
        server.shutdown()
        server.server_close()

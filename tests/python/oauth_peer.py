#!/usr/bin/env python3
"""Real OAuth / JOSE peers for the request-authentication tests.

  client  --token-url U --client-id I --client-secret S --cacert F --url U [--scope S] [--method M]
          authlib's OAuth2Session obtains a token (client credentials, client_secret_basic)
          and calls URL with it; prints {"token": ..., "status": ..., "body": ...}.
  verify  --jwks-url U --cacert F --token T --issuer I --audience A
          PyJWT checks the token against the published JWKS; prints the claims and header.
  keys    DIR   makes an issuer: RSA, EC P-256 and Ed25519 keys, DIR/jwks.json, and a TLS CA
          plus a 127.0.0.1 server certificate to serve the JWKS from.
  rotate  DIR   adds a new EC key (kid "ec-2") to DIR/jwks.json.
  mint    DIR --case C --iss I --aud A   prints a token for one case (good-rs256, good-ps256,
          good-es256, good-eddsa, none, hs256-public-key, unknown-kid, tampered, expired,
          not-yet-valid, wrong-iss, wrong-aud, jku, oversized, rotated) with claims from --claims JSON.
  serve   DIR --port P   serves DIR/jwks.json over HTTPS (re-read on every request).
"""
import argparse
import base64
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import ssl
import sys
import time

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def cmd_client(a):
    from authlib.integrations.requests_client import OAuth2Session

    s = OAuth2Session(a.client_id, a.client_secret, scope=a.scope, token_endpoint_auth_method="client_secret_basic")
    # Trust only the mesh's CA (and ignore any CA bundle the environment names).
    s.trust_env = False
    tok = s.fetch_token(a.token_url, grant_type="client_credentials", verify=a.cacert)
    r = s.request(a.method, a.url, headers=json.loads(a.headers or "{}"), verify=a.cacert)
    print(json.dumps({"token": tok["access_token"], "scope": tok.get("scope"), "expires_in": tok.get("expires_in"),
                      "status": r.status_code, "body": r.text}))


def cmd_verify(a):
    ctx = ssl.create_default_context(cafile=a.cacert)
    client = jwt.PyJWKClient(a.jwks_url, ssl_context=ctx)
    key = client.get_signing_key_from_jwt(a.token)
    claims = jwt.decode(a.token, key.key, algorithms=["ES256"], audience=a.audience, issuer=a.issuer,
                        options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]})
    print(json.dumps({"header": jwt.get_unverified_header(a.token), "claims": claims}))


def pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


def jwk(key, kid, alg):
    cls = {"RS256": RSAAlgorithm, "PS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    j = json.loads(cls.to_jwk(key.public_key()))
    j.update({"kid": kid, "use": "sig"})
    return j


def write(d, name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def cmd_keys(a):
    d = a.dir
    os.makedirs(d, exist_ok=True)
    keys = {"rsa.pem": rsa.generate_private_key(65537, 2048), "ec.pem": ec.generate_private_key(ec.SECP256R1()),
            "ed.pem": ed25519.Ed25519PrivateKey.generate(), "attacker.pem": ec.generate_private_key(ec.SECP256R1())}
    for name, k in keys.items():
        write(d, name, pem(k))
    jwks = {"keys": [jwk(keys["rsa.pem"], "rsa-1", "RS256"), jwk(keys["ec.pem"], "ec-1", "ES256"),
                     jwk(keys["ed.pem"], "ed-1", "EdDSA")]}
    write(d, "jwks.json", json.dumps(jwks).encode())
    # A CA and a server certificate for 127.0.0.1, to serve the JWKS over HTTPS.
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test idp CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    write(d, "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    write(d, "server.pem", srv.public_bytes(serialization.Encoding.PEM))
    write(d, "server-key.pem", pem(srv_key))


def cmd_rotate(a):
    k = ec.generate_private_key(ec.SECP256R1())
    write(a.dir, "ec2.pem", pem(k))
    with open(os.path.join(a.dir, "jwks.json")) as f:
        jwks = json.load(f)
    jwks["keys"].append(jwk(k, "ec-2", "ES256"))
    write(a.dir, "jwks.json", json.dumps(jwks).encode())


def cmd_mint(a):
    d, now = a.dir, int(time.time())
    claims = {"iss": a.iss, "sub": a.sub, "aud": a.aud, "iat": now, "exp": now + 300}
    claims.update(json.loads(a.claims or "{}"))
    c = a.case

    def sign(key_file, alg, kid, payload=claims, headers=None):
        h = {"kid": kid}
        h.update(headers or {})
        return jwt.encode(payload, load(d, key_file), algorithm=alg, headers=h)

    if c == "good-rs256":
        t = sign("rsa.pem", "RS256", "rsa-1")
    elif c == "good-ps256":
        t = sign("rsa.pem", "PS256", "rsa-1")
    elif c == "good-es256":
        t = sign("ec.pem", "ES256", "ec-1")
    elif c == "good-eddsa":
        t = sign("ed.pem", "EdDSA", "ed-1")
    elif c == "rotated":
        t = sign("ec2.pem", "ES256", "ec-2")
    elif c == "none":
        t = jwt.encode(claims, None, algorithm="none", headers={"kid": "ec-1"})
    elif c == "hs256-public-key":
        # The classic confusion: HMAC keyed with the issuer's public key (PyJWT itself refuses
        # to do this, so the token is assembled by hand).
        pub = load(d, "rsa.pem").public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        head = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
        body = b64(json.dumps(claims).encode())
        mac = hmac.new(pub, f"{head}.{body}".encode(), hashlib.sha256).digest()
        t = f"{head}.{body}.{b64(mac)}"
    elif c == "unknown-kid":
        t = sign("ec.pem", "ES256", "no-such-key")
    elif c == "tampered":
        h, _, s = sign("ec.pem", "ES256", "ec-1").split(".")
        evil = dict(claims, sub="admin")
        t = f"{h}.{b64(json.dumps(evil).encode())}.{s}"
    elif c == "expired":
        t = sign("ec.pem", "ES256", "ec-1", dict(claims, exp=now - 3600, iat=now - 7200))
    elif c == "not-yet-valid":
        t = sign("ec.pem", "ES256", "ec-1", dict(claims, nbf=now + 3600))
    elif c == "wrong-iss":
        t = sign("ec.pem", "ES256", "ec-1", dict(claims, iss="https://evil.test"))
    elif c == "wrong-aud":
        t = sign("ec.pem", "ES256", "ec-1", dict(claims, aud="payments"))
    elif c == "jku":
        # Signed by the attacker, whose key the header points at: must not be fetched or used.
        t = sign("attacker.pem", "ES256", "ec-1", headers={"jku": "https://127.0.0.1:1/evil.json",
                                                          "x5u": "https://127.0.0.1:1/evil.pem"})
    elif c == "oversized":
        t = sign("ec.pem", "ES256", "ec-1", dict(claims, pad="x" * 9000))
    else:
        sys.exit(f"unknown case {c}")
    print(t)


def cmd_serve(a):
    d = a.dir

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with open(os.path.join(d, "jwks.json"), "rb") as f:
                body = f.read()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with open(os.path.join(d, "fetches"), "a") as f:
                f.write(f"{time.time()}\n")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server-key.pem"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("serving", flush=True)
    srv.serve_forever()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    for f in ("--token-url", "--client-id", "--client-secret", "--cacert", "--url"):
        c.add_argument(f, required=True)
    c.add_argument("--scope")
    c.add_argument("--method", default="GET")
    c.add_argument("--headers")
    v = sub.add_parser("verify")
    for f in ("--jwks-url", "--cacert", "--token", "--issuer", "--audience"):
        v.add_argument(f, required=True)
    k = sub.add_parser("keys")
    k.add_argument("dir")
    r = sub.add_parser("rotate")
    r.add_argument("dir")
    m = sub.add_parser("mint")
    m.add_argument("dir")
    m.add_argument("--case", required=True)
    m.add_argument("--iss", required=True)
    m.add_argument("--aud", required=True)
    m.add_argument("--sub", default="user-1")
    m.add_argument("--claims")
    s = sub.add_parser("serve")
    s.add_argument("dir")
    s.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    {"client": cmd_client, "verify": cmd_verify, "keys": cmd_keys, "rotate": cmd_rotate, "mint": cmd_mint,
     "serve": cmd_serve}[a.cmd](a)


if __name__ == "__main__":
    main()

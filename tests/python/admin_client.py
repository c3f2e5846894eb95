#!/usr/bin/env python3
"""A client of Palisade's gRPC API that is not Palisade's: Python stubs are
generated from the shipped .proto with grpcio-tools, and every call goes over
TLS to a real control plane (docs/api.md).

Usage: admin_client.py https://HOST:PORT ADMIN_DIR
Needs: pip install grpcio grpcio-tools grpcio-reflection cryptography
Exit 0 when every check passed; otherwise the failed check and exit 1.
"""
import os
import sys
import tempfile

import grpc
import grpc_tools
from grpc_tools import protoc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto", "proto")
SERVER_NAME = "localhost"  # a DNS SAN of the control plane's certificate (--server-name)


def stubs():
    out = tempfile.mkdtemp(prefix="palisade-stubs-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "palisade/v1/palisade.proto"])
    assert rc == 0, f"protoc failed ({rc})"
    sys.path.insert(0, out)
    from palisade.v1 import palisade_pb2, palisade_pb2_grpc
    return palisade_pb2, palisade_pb2_grpc


def channel(target, ca, cert=None, key=None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def refused(call, code):
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        return e.details()
    raise AssertionError(f"expected {code}, the call succeeded")


def check(what, ok=True):
    assert ok, what
    print(f"ok  {what}")


POLICY = """apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: py-reads, namespace: py}
spec:
  target: {identities: ["spiffe://cluster.local/ns/py/sa/api"]}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://cluster.local/ns/py/sa/caller"]}]
      to: [{methods: [GET]}]
"""


def main():
    addr, admin_dir = sys.argv[1], sys.argv[2]
    target = addr.removeprefix("https://").rstrip("/")
    pb, rpc = stubs()
    read = lambda name: open(os.path.join(admin_dir, name), "rb").read()
    ca = read("ca.pem")
    admin_ch = channel(target, ca, read("cert.pem"), read("key.pem"))
    admin = rpc.AdminStub(admin_ch)

    status = admin.GetStatus(pb.GetStatusRequest(), timeout=10)
    check(f"GetStatus as {status.caller_identity}", status.caller_identity.endswith("/palisade/admin"))

    api_id = "spiffe://cluster.local/ns/py/sa/api"
    token = admin.CreateJoinToken(pb.CreateJoinTokenRequest(identity=api_id, ttl_seconds=600, uses=1), timeout=10)
    check(f"CreateJoinToken {token.info.id} for {token.info.identity}", token.token and token.info.identity == api_id)
    admin.CreateJoinToken(pb.CreateJoinTokenRequest(identity="spiffe://cluster.local/ns/py/sa/caller"), timeout=10)

    applied = admin.ApplyPolicy(pb.ApplyPolicyRequest(document=POLICY), timeout=10)
    a = applied.applied[0]
    check(f"ApplyPolicy {a.kind} {a.key} {a.change} (revision {a.revision})",
          (a.kind, a.key, a.change) == ("AuthorizationPolicy", "py/py-reads", "created") and a.revision > 0)
    check("ApplyPolicy has no warnings", list(applied.warnings) == [])
    listed = admin.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    check(f"ListPolicies shows it (store revision {listed.revision})", any(p.key == "py/py-reads" for p in listed.policies))
    got = admin.GetPolicy(pb.GetPolicyRequest(kind="authorizationpolicy", key="py/py-reads"), timeout=10)
    check("GetPolicy returns the canonical JSON", '"name":"py-reads"' in got.json)
    bad = refused(lambda: admin.ApplyPolicy(pb.ApplyPolicyRequest(document="kind: Nope\n"), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT)
    check(f"ApplyPolicy of a bad document: INVALID_ARGUMENT ({bad})")

    sim = lambda m: admin.Simulate(pb.SimulateRequest(source="spiffe://cluster.local/ns/py/sa/caller", target=api_id,
                                                      method=m, path="/x"), timeout=10)
    allow, deny = sim("GET"), sim("POST")
    check(f"Simulate GET: {allow.decision} by {allow.policy} rule {allow.rule}",
          (allow.decision, allow.policy, allow.rule) == ("allow", "py/py-reads", 0))
    check(f"Simulate POST: {deny.decision} ({deny.reason})", deny.decision == "deny")

    # A workload certificate, obtained with the join token (TLS, no client certificate).
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    identity = rpc.IdentityStub(channel(target, ca))
    cert = identity.Certify(pb.CertifyRequest(csr_der=csr.public_bytes(serialization.Encoding.DER),
                                              join_token=token.token), timeout=10)
    check(f"Identity.Certify issued {cert.spiffe_id} serial {cert.serial}", cert.spiffe_id == api_id)
    chain = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                     for d in cert.cert_chain_der)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    workload = rpc.AdminStub(channel(target, ca, chain, key_pem))
    why = refused(lambda: workload.ListProxies(pb.ListProxiesRequest(), timeout=10), grpc.StatusCode.PERMISSION_DENIED)
    check(f"Admin refuses the workload certificate: PERMISSION_DENIED ({why})")
    anonymous = rpc.AdminStub(channel(target, ca))
    why = refused(lambda: anonymous.ListProxies(pb.ListProxiesRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED)
    check(f"Admin refuses a caller without a certificate: UNAUTHENTICATED ({why})")
    refused(lambda: identity.Certify(pb.CertifyRequest(csr_der=csr.public_bytes(serialization.Encoding.DER),
                                                       join_token=token.token), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED)
    check("the used join token is refused: UNAUTHENTICATED")

    deleted = admin.DeletePolicy(pb.GetPolicyRequest(kind="AuthorizationPolicy", key="py/py-reads"), timeout=10)
    check(f"DeletePolicy (store revision {deleted.revision})", deleted.revision > a.revision)
    refused(lambda: admin.GetPolicy(pb.GetPolicyRequest(kind="ap", key="py/py-reads"), timeout=10),
            grpc.StatusCode.NOT_FOUND)
    check("GetPolicy after delete: NOT_FOUND")

    services = set(ProtoReflectionDescriptorDatabase(admin_ch).get_services())
    expected = {"palisade.v1.Identity", "palisade.v1.Admin", "palisade.v1.MeshConfig", "palisade.v1.Discovery",
                "grpc.health.v1.Health"}
    check(f"server reflection lists {sorted(services)}", expected <= services)
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, grpc.RpcError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)

#!/usr/bin/env python3
"""OpenTelemetry peers for the tracing tests, from PyPI's official packages.

  otlp_peer.py collector
      An OTLP/gRPC trace receiver built from the official opentelemetry-proto
      definitions and grpcio, on 127.0.0.1 (a free port, printed first). Every
      span it receives is printed as one JSON line: trace_id, span_id,
      parent_span_id (hex), name, kind, service (resource service.name) and
      attributes.

  otlp_peer.py client URL [HEADER=VALUE ...]
      A client traced with the OpenTelemetry Python SDK: starts a span, injects
      its W3C traceparent into a GET of URL, and prints {"trace_id", "span_id",
      "status", "body"} as JSON.
"""
import json
import sys


def collector():
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    def value(v):
        kind = v.WhichOneof("value")
        return getattr(v, kind) if kind else None

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            for rs in request.resource_spans:
                service = next((value(a.value) for a in rs.resource.attributes if a.key == "service.name"), None)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        print(json.dumps({
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": s.kind,
                            "service": service,
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                        }), flush=True)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def client(url, extra):
    import urllib.request

    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("palisade-test-client")
    with tracer.start_as_current_span("checkout") as span:
        headers = dict(h.split("=", 1) for h in extra)
        propagate.inject(headers)
        req = urllib.request.Request(url, headers=headers)
        # Loopback only: no proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            body = resp.read().decode()
            status = resp.status
        ctx = span.get_span_context()
        print(json.dumps({
            "trace_id": format(ctx.trace_id, "032x"),
            "span_id": format(ctx.span_id, "016x"),
            "status": status,
            "body": body,
        }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "collector":
        collector()
    elif len(sys.argv) >= 3 and sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)

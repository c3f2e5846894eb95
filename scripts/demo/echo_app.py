#!/usr/bin/env python3
"""A tiny demo app: answers every request with what it received, including
the caller identity the Palisade sidecar put in x-palisade-peer-identity and,
when the request carried a verified credential, its principal."""
import http.server
import json
import os
import random
import signal
import sys
import time

# To play an instance that is slow or failing (see docs/resilience.md):
# ECHO_DELAY_MS waits that long before every answer; ECHO_FAIL_PERCENT
# answers that share of requests 503.
DELAY = int(os.environ.get("ECHO_DELAY_MS", "0")) / 1000
FAIL = int(os.environ.get("ECHO_FAIL_PERCENT", "0"))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        seen = {
            "app": sys.argv[2] if len(sys.argv) > 2 else "app",
            "path": self.path,
            "caller": self.headers.get("x-palisade-peer-identity"),
        }
        # With request authentication: the verified principal and any claim headers.
        for name, header in (("principal", "x-palisade-request-principal"), ("client", "x-client-id")):
            if self.headers.get(header):
                seen[name] = self.headers.get(header)
        # A request body (POST) is read whole, and shown when it is JSON.
        length = int(self.headers.get("content-length") or 0)
        if length:
            received = self.rfile.read(length)
            try:
                seen["body"] = json.loads(received)
            except ValueError:
                seen["body_bytes"] = len(received)
        if DELAY:
            time.sleep(DELAY)
        if FAIL and random.randrange(100) < FAIL:
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = json.dumps(seen).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


# Stops at once on SIGTERM (as PID 1 in a container the default action does
# not apply, and podman or Kubernetes would wait its grace period, then kill).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

# argv: PORT [NAME [HOST]] (HOST defaults to 127.0.0.1: behind a sidecar).
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
try:
    server = http.server.ThreadingHTTPServer((host, int(sys.argv[1])), Handler)
except OSError as e:
    sys.exit(f"error: cannot listen on {host}:{sys.argv[1]}: {e.strerror}")
server.serve_forever()

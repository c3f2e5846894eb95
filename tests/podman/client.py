#!/usr/bin/env python3
"""GET URL [COUNT]: prints one line per request, "STATUS BODY" or
"ERROR reason" (the test's app-side client inside a pod)."""
import http.client
import sys
import urllib.parse

url = urllib.parse.urlsplit(sys.argv[1])
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
    try:
        c = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)
        c.request("GET", url.path or "/")
        r = c.getresponse()
        print(r.status, r.read().decode(errors="replace").strip(), flush=True)
        c.close()
    except Exception as e:  # the test reads the reason
        print("ERROR", type(e).__name__, e, flush=True)

#!/usr/bin/env python3
"""CORS in a real browser: headless Chromium (Debian's, driven by selenium)
loads a page from an allowed origin and one from a refused origin; each page
calls the meshed API with fetch. Prints {"allowed": {...}, "denied": {...}}.

  cors_browser.py --api http://127.0.0.1:PORT --allowed-port P1 --denied-port P2

Exits 3 when Chromium cannot start (the test then says SKIPPED, or fails
under CI=true).
"""
import argparse
import http.server
import json
import sys
import tempfile
import threading

PAGE = """<!doctype html><meta charset="utf-8"><title>cors</title><script>
const api = %(api)s;
async function attempt(name, url, init) {
  try {
    const r = await fetch(url, init);
    const body = await r.text();
    return [name, {ok: true, status: r.status, body: body.slice(0, 2000),
                   exposed: r.headers.get("x-served-by")}];
  } catch (e) {
    return [name, {ok: false, error: String(e)}];
  }
}
(async () => {
  const out = await Promise.all([
    attempt("simple", api + "/echo", {}),
    attempt("credentials", api + "/echo", {credentials: "include"}),
    attempt("preflighted_put", api + "/echo", {method: "PUT", headers: {"x-token": "t-1", "content-type": "application/json"}, body: "{}"}),
  ]);
  window.results = Object.fromEntries(out);
})();
</script>"""


def serve(port, api):
    page = (PAGE % {"api": json.dumps(api)}).encode()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True)
    p.add_argument("--allowed-port", type=int, required=True)
    p.add_argument("--denied-port", type=int, required=True)
    a = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    serve(a.allowed_port, a.api)
    serve(a.denied_port, a.api)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="palisade-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    except Exception as e:  # noqa: BLE001 - any failure to start the browser
        print(f"chromium cannot start: {e}", file=sys.stderr)
        sys.exit(3)
    out = {}
    try:
        driver.set_script_timeout(30)
        for name, port in (("allowed", a.allowed_port), ("denied", a.denied_port)):
            driver.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.results !== undefined"))
            out[name] = driver.execute_script("return window.results")
        out["browser"] = driver.capabilities.get("browserVersion")
    finally:
        driver.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium (Debian's, driven by
selenium) as a line-oriented command server, so a Rust test can drive it step
by step. One JSON command a line on stdin, exactly one JSON reply a line on
stdout.

  dashboard_browser.py --screenshots DIR

Prints {"ready": true, "browser": "<version>"} once Chromium is up; exits 3
when Chromium cannot start (the test then says SKIPPED, or fails under
CI=true). Commands (every reply has "ok"; a failure is {"ok": false,
"error": "..."}, never a crash):

  {"cmd":"open","url":"..."}                      -> {"ok":true,"url":..,"title":..}
  {"cmd":"wait","css":"SEL","text":"sub","count":N,"timeout":S}
                                                  -> {"ok":true,"elapsed":s,"text":..}
                                                     or {"ok":false,"error":"timeout",..}
  {"cmd":"click","css":..}
  {"cmd":"type","css":..,"text":..,"clear":true}
  {"cmd":"keys","css":..,"keys":"ENTER"|"TAB"|..}
  {"cmd":"text","css":..}                         -> {"ok":true,"texts":[..]}
  {"cmd":"attr","css":..,"name":..}               -> {"ok":true,"values":[..]}
  {"cmd":"eval","js":"return ..."}                -> {"ok":true,"value":..}
  {"cmd":"screenshot","name":"graph"}             -> DIR/graph.png, {"ok":true,"path":..}
  {"cmd":"console"}                               -> {"ok":true,"errors":[..]} (SEVERE and
                                                     WARNING entries since the last call)
  {"cmd":"perf"}                                  -> {"ok":true,"transfer_bytes":..,
                                                     "dom_interactive_ms":..,"load_ms":..}
  {"cmd":"quit"}                                  -> exits 0 (so does EOF on stdin)
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

PERF_JS = """
const nav = performance.getEntriesByType('navigation')[0];
const res = performance.getEntriesByType('resource');
const origin = location.origin;
let total = 0;
const size = (e) => {
  if (e.transferSize > 0) return e.transferSize;
  let same = false;
  try { same = new URL(e.name, location.href).origin === origin; } catch (_) { same = false; }
  return same ? (e.encodedBodySize || 0) : 0;
};
if (nav) total += size(nav);
for (const r of res) total += size(r);
return {
  transfer_bytes: total,
  dom_interactive_ms: nav ? nav.domInteractive : null,
  load_ms: nav ? (nav.loadEventEnd || nav.domComplete) : null,
  resources: res.length,
};
"""


# The text of an element as shown (innerText), or its textContent for SVG and
# hidden elements, trimmed.
TEXT_FN = """
const svgText = (e) => {
  // an SVG element's visible text: its <text> content, not its <title> tooltip
  let out = '';
  for (const n of e.childNodes) {
    if (n.nodeType === 3) out += n.nodeValue;
    else if (n.nodeType === 1 && n.localName !== 'title') out += (out && !/\s$/.test(out) ? ' ' : '') + svgText(n);
  }
  return out;
};
const textOf = (e) => {
  if (e instanceof SVGElement) {
    const t = svgText(e).trim();
    return t || (e.textContent || '').trim();
  }
  let t = (typeof e.innerText === 'string') ? e.innerText : '';
  if (!t || !t.trim()) t = e.textContent || '';
  return t.trim();
};
"""
TEXTS_JS = TEXT_FN + """
return Array.from(document.querySelectorAll(arguments[0])).map(textOf);
"""
WAIT_JS = TEXT_FN + """
const [css, want, count] = arguments;
const texts = Array.from(document.querySelectorAll(css)).map(textOf);
if (want !== null && want !== undefined) {
  const hits = texts.filter((t) => t.includes(want));
  return {ok: hits.length >= count, text: hits.length ? hits[0] : (texts.length ? texts[0] : null)};
}
return {ok: texts.length >= count, text: texts.length ? texts[0] : null};
"""

# The attribute as written (SVG's viewBox, data-*), or for value/checked/selected
# of a form control its live property.
ATTRS_JS = """
const [css, name] = arguments;
return Array.from(document.querySelectorAll(css)).map((e) => {
  if ((name === 'value' || name === 'checked' || name === 'selected') && name in e) return String(e[name]);
  return e.getAttribute(name);
});
"""


def reply(obj):
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="palisade-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900", "--force-device-scale-factor=1",
                 "--hide-scrollbars", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    except Exception as e:  # noqa: BLE001 - any failure to start the browser
        print(f"chromium cannot start: {e}", file=sys.stderr)
        shutil.rmtree(profile, ignore_errors=True)
        sys.exit(3)
    try:
        # the viewport (what a screenshot shows) 1400x900: the window's own
        # frame is added to the size asked for
        driver.set_window_size(1400, 900)
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        if inner and (inner[0] != 1400 or inner[1] != 900):
            driver.set_window_size(1400 + 1400 - inner[0], 900 + 900 - inner[1])
    except Exception:  # noqa: BLE001 - headless may refuse; the flag already set a size
        pass
    driver.set_script_timeout(30)
    driver.set_page_load_timeout(30)
    return driver, profile


class Session:
    def __init__(self, driver, shots):
        self.d = driver
        self.shots = shots

    def find_all(self, css):
        from selenium.webdriver.common.by import By
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def find_one(self, css):
        els = self.find_all(css)
        if not els:
            raise LookupError(f"no element matches {css!r}")
        return els[0]

    def c_open(self, c):
        self.d.get(c["url"])
        return {"ok": True, "url": self.d.current_url, "title": self.d.title}

    def c_wait(self, c):
        css = c["css"]
        want = c.get("text")
        count = int(c.get("count") or 1)
        timeout = float(c.get("timeout", 10))
        start = time.monotonic()
        last = None
        while True:
            try:
                # one round trip a poll, however many elements match
                r = self.d.execute_script(WAIT_JS, css, want, count)
                last = r.get("text")
                if r.get("ok"):
                    return {"ok": True, "elapsed": time.monotonic() - start, "text": last}
            except Exception as e:  # noqa: BLE001 - page navigating, or a bad selector
                if "SyntaxError" in str(e) or "not a valid selector" in str(e):
                    raise
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                return {"ok": False, "error": "timeout", "elapsed": elapsed, "text": last}
            time.sleep(0.05)

    def c_click(self, c):
        el = self.find_one(c["css"])
        try:
            el.click()
        except Exception:  # noqa: BLE001 - e.g. an SVG <g> or an element under another: click by script
            self.d.execute_script(
                "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true, view: window}));", el)
        return {"ok": True}

    def c_type(self, c):
        el = self.find_one(c["css"])
        if c.get("clear", True):
            el.clear()
        el.send_keys(c.get("text", ""))
        return {"ok": True}

    def c_keys(self, c):
        from selenium.webdriver.common.keys import Keys
        el = self.find_one(c["css"])
        spec = c.get("keys", "")
        key = getattr(Keys, spec.upper(), None) if isinstance(spec, str) else None
        el.send_keys(key if key is not None else spec)
        return {"ok": True}

    def c_text(self, c):
        return {"ok": True, "texts": self.d.execute_script(TEXTS_JS, c["css"])}

    def c_attr(self, c):
        return {"ok": True, "values": self.d.execute_script(ATTRS_JS, c["css"], c["name"])}

    def c_eval(self, c):
        return {"ok": True, "value": self.d.execute_script(c["js"])}

    def c_screenshot(self, c):
        name = os.path.basename(str(c["name"])) or "shot"
        os.makedirs(self.shots, exist_ok=True)
        path = os.path.join(self.shots, name + ".png")
        if not self.d.save_screenshot(path):
            return {"ok": False, "error": "screenshot failed"}
        return {"ok": True, "path": path}

    def c_console(self, _c):
        errs = []
        for e in self.d.get_log("browser"):
            if e.get("level") in ("SEVERE", "WARNING"):
                errs.append({"level": e.get("level"), "message": e.get("message"), "source": e.get("source")})
        return {"ok": True, "errors": errs}

    def c_perf(self, _c):
        v = self.d.execute_script(PERF_JS)
        out = {"ok": True}
        out.update(v or {})
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--screenshots", required=True)
    a = p.parse_args()
    os.makedirs(a.screenshots, exist_ok=True)
    driver, profile = start_browser()
    s = Session(driver, a.screenshots)
    reply({"ready": True, "browser": driver.capabilities.get("browserVersion")})
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                c = json.loads(line)
                cmd = c.get("cmd")
                if cmd == "quit":
                    reply({"ok": True})
                    break
                fn = getattr(s, "c_" + str(cmd), None)
                if fn is None:
                    reply({"ok": False, "error": f"unknown command {cmd!r}"})
                    continue
                reply(fn(c))
            except Exception as e:  # noqa: BLE001 - a failed command is a reply, never a crash
                msg = str(e).strip().splitlines()
                reply({"ok": False, "error": f"{type(e).__name__}: {msg[0] if msg else ''}"})
    finally:
        try:
            driver.quit()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(profile, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()

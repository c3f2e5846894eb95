#!/usr/bin/env python3
"""Runs the walk-throughs in docs/walkthroughs/ (and README.md's taste after
them): every ```sh block under a
"# Walk-through" (or "## Walk-through") heading, file after file in name order
(01-..., 02-...: state carries over from one to the next), in one bash session
from the repository root, with the debug binaries first on PATH. This is the
local demo (./scripts/demo.sh).

With --check, each block's output is compared with the output block that
follows it in the docs, so the
docs cannot drift from what the commands print. What varies from run to run
is compared loosely: timestamps (with or without fractions), durations, long hex ids (serials, token ids),
5-digit (ephemeral) ports, Retry-After/reset seconds, the Date header, and
`pending`/`synced` in proxy listings. A line `...` in an expected block stands
for any number of lines. Every block must exit 0.

Usage: walkthrough.py [--check] [--keep] [--cwd DIR] [FILE|DIR ...]
       (default: docs/walkthroughs README.md, what ./scripts/demo.sh runs; a DIR
       stands for its NN-*.md files, in order)
       walkthrough.py --self-test      (the comparison's own tests)

--cwd DIR runs the commands in DIR instead of the repository root (the test
suite uses a scratch directory holding a `scripts` link, so a user's own
./demo-data is left alone).
"""
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "@@palisade-walkthrough-done"
BLOCK_TIMEOUT = 90


def walk_files(paths):
    """The Markdown files to run, in order: a directory stands for its
    numbered files (01-identity.md, 02-...), sorted by name."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(
                os.path.join(p, f) for f in os.listdir(p) if re.match(r"^\d+-.*\.md$", f)
            )
        else:
            files.append(p)
    return files


def blocks(paths):
    """[(section, code, expected_or_None)] for the walk-through sections of
    the files, in order."""
    out = []
    for path in paths:
        out += file_blocks(path)
    return out


def file_blocks(path):
    out, section, in_walk = [], None, False
    fence, lang, buf = None, None, []
    pending = None  # the last sh block, waiting for its output block
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if fence is None:
            h = re.match(r"^#{1,2} (.*)$", line)
            if h:
                in_walk = h.group(1).startswith("Walk-through")
                section = h.group(1)
                pending = None
            m = re.match(r"^(\s*)```(\w*)\s*$", line)
            if m and in_walk:
                fence, lang, buf = m.group(1), m.group(2), []
            continue
        if line.strip() == "```":
            text = [l[len(fence):] if l.startswith(fence) else l.lstrip() for l in buf]
            if lang == "sh":
                pending = [section, "\n".join(text), None]
                out.append(pending)
            elif lang == "text" and pending is not None and pending[2] is None:
                pending[2] = text
                pending = None
            fence = None
            continue
        buf.append(line)
    return [tuple(b) for b in out]


VARIABLE = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)"
    r"|(?P<dms>(?<=\"duration_ms\":)[0-9.]+|(?<=\"duration_ms\": )[0-9.]+|\b\d+\.\d+ms\b)"
    r"|(?P<date>^date: .*$)"
    r"|(?P<ra>(?<=retry-after: )\d+)"
    r"|(?P<reset>(?<=;t=)\d+)"
    r"|(?P<port>(?<=127\.0\.0\.1:)\d{5})"
    r"|(?P<hex>\b[0-9a-f]{8,}\b)"
    r"|(?P<dur>\b\d+(?:d|h|m|s|ms)(?: \d+(?:h|m|s))?\b)"
    r"|(?P<rate>\b\d+\.\d+/s\b)"
    r"|(?P<sync>\b(?:pending|synced)$)",
    re.IGNORECASE,
)
LOOSE = {
    "ts": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z",
    "dms": r"[0-9.]+(?:ms)?",
    "date": r"date: .*",
    "ra": r"\d+",
    "reset": r"\d+",
    "port": r"\d+",
    "hex": r"[0-9a-f]+",
    "dur": r"\d+(?:d|h|m|s|ms)(?: \d+(?:h|m|s))?",
    "rate": r"\d+\.\d+/s",
    "sync": r"(?:pending|synced)",
}


def squeeze(s):
    return re.sub(r"[ \t]+", " ", s.rstrip())


def pattern(expected_line):
    line, pos, parts = squeeze(expected_line), 0, []
    for m in VARIABLE.finditer(line):
        parts.append(re.escape(line[pos:m.start()]))
        parts.append(LOOSE[m.lastgroup])
        pos = m.end()
    parts.append(re.escape(line[pos:]))
    return re.compile("^" + "".join(parts).replace(r"\ ", " ") + "$", re.IGNORECASE)


def matches(expected, actual):
    """Whether actual lines match the expected lines (`...` = any lines)."""
    actual = [squeeze(l) for l in actual]
    while actual and not actual[-1]:
        actual.pop()
    expected = list(expected)
    while expected and not expected[-1].strip():
        expected.pop()

    def go(i, j):
        if i == len(expected):
            return j == len(actual)
        if expected[i].strip() == "...":
            return any(go(i + 1, k) for k in range(j, len(actual) + 1))
        return j < len(actual) and pattern(expected[i]).match(actual[j]) is not None and go(i + 1, j + 1)

    return go(0, 0)


def commands(code):
    """The block's commands: its lines, with backslash continuations joined."""
    out, cur = [], []
    for line in code.splitlines():
        cur.append(line)
        if not line.endswith("\\"):
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return [c for c in out if c.strip()]


def run(shell, command, buf):
    """Runs one command in the shell; (its output, its exit status, unread rest)."""
    shell.stdin.write(f"{{\n{command}\n}}\necho \"{MARK} $?\"\n".encode())
    shell.stdin.flush()
    deadline = time.monotonic() + BLOCK_TIMEOUT
    while True:
        m = re.search(rb"(?m)^" + MARK.encode() + rb" (\d+)\n", buf)
        if m:
            return buf[:m.start()], int(m.group(1)), buf[m.end():]
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, "timeout", b""
        ready, _, _ = select.select([shell.stdout], [], [], left)
        if ready:
            chunk = os.read(shell.stdout.fileno(), 65536)
            if not chunk:
                return buf, "shell exited", b""
            buf += chunk


def busy_ports(code):
    """Fixed loopback ports the walk-through binds that something already holds."""
    ports = sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d{4})\b", code)} | {
        int(p) for p in re.findall(r"echo_app\.py (\d+)", code)})
    busy = []
    for p in ports:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", p)) == 0:
                busy.append(p)
    return busy


def sidecars(code):
    """[(name, {flag: value})] of the sidecars the walk-through starts: every
    `palisade-sidecar` command but `wait-ready` and `init`, named after its
    join token file (demo-data/web.token: web)."""
    out = []
    for command in commands(code):
        flat = command.replace("\\\n", " ")
        if not re.search(r"(^|[;&|]\s*)palisade-sidecar\s+--", flat):
            continue
        flags = dict(re.findall(r"--(inbound|admin|app|upstream|join-token-file)[ =](\S+)", flat))
        name = os.path.basename(flags.get("join-token-file", "sidecar")).split(".")[0]
        out.append((name, flags))
    return out


def keep_message(cwd, bin_dir, control_plane, credentials, code):
    """What --keep prints: the exports another shell needs to use the running
    mesh, the sidecars' addresses, and how to stop it."""
    credentials = os.path.join(cwd, credentials) if credentials and not os.path.isabs(credentials) else credentials
    lines = [
        "Everything is still running (logs in demo-data/*.log). To use the mesh from another shell:",
        "",
        f"  export PATH=\"{bin_dir}:$PATH\" PALISADE_CONTROL_PLANE={control_plane} PALISADE_CREDENTIALS={credentials}",
        "  palisadectl proxies",
        "",
        "Sidecars:",
    ]
    for name, f in sidecars(code):
        parts = [f"inbound {f['inbound']}" if "inbound" in f else None,
                 f"admin http://{f['admin']}" if "admin" in f else None,
                 f"app {f['app']}" if "app" in f else None,
                 "calls " + f["upstream"].replace("=", " -> ") if "upstream" in f else None]
        lines.append(f"  {name:<8} " + ", ".join(p for p in parts if p))
    lines += ["", "To stop everything: Ctrl-C here (or kill " + str(os.getpid()) + ")."]
    return "\n".join(lines)


def self_test():
    doc = ["[ok]   CA valid: expires 2027-12-01T07:27:37Z (in 364d 23h)", "retry-after: 12", "...", "r1  synced"]
    assert matches(doc, ["[ok] CA valid: expires 2028-01-02T00:00:00Z (in 3d)", "retry-after: 7", "r1 pending"])
    assert matches(doc, ["[ok] CA valid: expires 2028-01-02T00:00:00Z (in 9m 2s)", "retry-after: 7", "x", "y", "r1 synced"])
    assert not matches(doc, ["[FAIL] CA valid: expires 2028-01-02T00:00:00Z (in 3d)", "retry-after: 7", "r1 synced"])
    assert not matches(doc, ["[ok] CA valid: expires 2028-01-02T00:00:00Z (in 3d)", "retry-after: 7", "r2 synced"])
    assert not matches(doc, ["[ok] CA valid: expires 2028-01-02T00:00:00Z (in 3d)", "retry-after: 7"])
    assert not matches(["forbidden", " -> 403"], ["forbidden", " -> 200"])
    assert not matches(["a"], ["a", "b"])
    assert matches(['{"time":"2026-12-01T17:20:00.123456Z","duration_ms":0.41}'], ['{"time":"2026-12-02T01:02:03.9Z","duration_ms":12.5}'])
    assert matches(['    "duration_ms": 0.35,'], ['    "duration_ms": 12.5,'])
    assert matches(["GET /x 403 deny 0.4ms"], ["GET /x 403 deny 13.25ms"])
    assert not matches(["GET /x 403 deny 0.4ms"], ["GET /x 200 allow 0.4ms"])
    assert matches(["127.0.0.1:4143 127.0.0.1:54848"], ["127.0.0.1:4143 127.0.0.1:33678"])
    assert not matches(["127.0.0.1:4143"], ["127.0.0.1:4144"])
    assert not matches(["Serial: 7fe07ff9d3dc6c65"], ["Serial: (none)"])
    code = "curl -s 'a' \\\n  -H x\necho b &\n"
    assert commands(code) == ["curl -s 'a' \\\n  -H x", "echo b &"], commands(code)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for name, text in [
            ("02-b.md", "# Walk-through: b\n\n```sh\necho b\n```\n```text\nb\n```\n"),
            ("01-a.md", "# Walk-through: a\n\n1. step\n\n   ```sh\n   echo a\n   ```\n## Notes\n\n```sh\nnot run\n```\n"),
            ("README.md", "# Walk-through: not numbered\n\n```sh\nnot run\n```\n"),
        ]:
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        got = blocks(walk_files([d]))
        assert got == [("Walk-through: a", "echo a", None), ("Walk-through: b", "echo b", ["b"])], got
    assert matches(["orders   1   21   0.5/s   100.00%   42.86%   0.5ms"], ["orders 1 21 12.25/s 100.00% 42.86% 3.5ms"])
    assert not matches(["orders   1   21   0.5/s   100.00%"], ["orders 1 0 0.0/s 100.00%"])
    code = ("palisade-sidecar --ca-bundle c --join-token-file demo-data/web.token \\\n"
            "  --inbound 127.0.0.1:4143 --admin 127.0.0.1:4191 --upstream 127.0.0.1:9001=orders.shop 2> w.log &\n"
            "palisade-sidecar wait-ready --admin 127.0.0.1:4191\n"
            "palisade-sidecar --join-token-file demo-data/orders.token --inbound 127.0.0.1:4144 --app 127.0.0.1:8081 --admin 127.0.0.1:4192 &\n")
    msg = keep_message("/w", "/b", "https://127.0.0.1:7700", "demo-data/cp/admin", code)
    assert 'export PATH="/b:$PATH" PALISADE_CONTROL_PLANE=https://127.0.0.1:7700 PALISADE_CREDENTIALS=/w/demo-data/cp/admin' in msg, msg
    assert "  web      inbound 127.0.0.1:4143, admin http://127.0.0.1:4191, calls 127.0.0.1:9001 -> orders.shop" in msg, msg
    assert "  orders   inbound 127.0.0.1:4144, admin http://127.0.0.1:4192, app 127.0.0.1:8081" in msg, msg
    assert msg.count("inbound") == 2 and "Ctrl-C" in msg, msg
    print("walkthrough self-test: ok")


def main():
    if "--self-test" in sys.argv:
        return self_test()
    argv = sys.argv[1:]
    cwd = ROOT
    if "--cwd" in argv:
        i = argv.index("--cwd")
        cwd = os.path.abspath(argv[i + 1])
        del argv[i:i + 2]
    args = [a for a in argv if not a.startswith("--")]
    check, keep = "--check" in argv, "--keep" in argv
    files = walk_files(args or [os.path.join(ROOT, "docs", "walkthroughs"), os.path.join(ROOT, "README.md")])
    todo = blocks(files)
    if not todo:
        sys.exit(f"{' '.join(args) or 'docs/walkthroughs'}: no ```sh blocks under a 'Walk-through' heading")
    busy = busy_ports("\n".join(code for _, code, _ in todo))
    if busy:
        sys.exit(
            "error: the walk-through needs 127.0.0.1 ports "
            + ", ".join(map(str, busy))
            + ", and something already listens there (another demo still running?). Stop it first."
        )
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    bold = (lambda s: f"\033[1m{s}\033[0m") if color else (lambda s: s)
    env = dict(os.environ, NO_COLOR="1", PATH=os.path.join(ROOT, "target", "debug") + os.pathsep + os.environ["PATH"])
    bin_dir = os.environ.get("PALISADE_BIN_DIR")
    if bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    shell = subprocess.Popen(
        ["bash", "--noprofile", "--norc"], cwd=cwd, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    failures = []

    def stop():
        try:
            os.killpg(shell.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            shell.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(1)))
    buf = b""
    try:
        section = None
        for n, (sec, code, expected) in enumerate(todo, 1):
            if sec != section:
                print("\n" + bold(f"## {sec}"))
                section = sec
            print(flush=True)
            output, status = b"", 0
            for command in commands(code):
                print("\n".join(bold(("$ " if i == 0 else "") + l) for i, l in enumerate(command.splitlines())), flush=True)
                out, status, buf = run(shell, command, buf)
                sys.stdout.write(out.decode(errors="replace"))
                sys.stdout.flush()
                output += out
                if status != 0:
                    break
            text = output.decode(errors="replace")
            lines = text.splitlines()
            if status != 0:
                failures.append(f"block {n} ({sec}) exited {status}:\n{code}")
                break
            if check and expected is not None and not matches(expected, lines):
                failures.append(
                    f"block {n} ({sec}) printed other output than the docs show.\n--- command\n{code}\n"
                    "--- docs\n" + "\n".join(expected) + "\n--- printed\n" + text
                )
        if keep and not failures:
            probe = 'printf "%s\\n" "$PALISADE_CONTROL_PLANE" "$PALISADE_CREDENTIALS" "$(dirname "$(command -v palisadectl)")"'
            out, _, buf = run(shell, probe, buf)
            control_plane, credentials, bin_dir = (out.decode(errors="replace").splitlines() + ["", "", ""])[:3]
            code = "\n".join(c for _, c, _ in todo)
            print("\n" + keep_message(cwd, bin_dir, control_plane, credentials, code), flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        stop()
    if failures:
        print("\n" + "\n\n".join(failures), file=sys.stderr)
        sys.exit(1)
    if check:
        print(f"\nwalk-through: {len(todo)} command blocks ran, "
              f"{sum(1 for t in todo if t[2] is not None)} outputs matched the docs")


if __name__ == "__main__":
    main()

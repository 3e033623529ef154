"""Start the service, send requests, restart it, and compare: time to first response cold vs warm.

    python examples/service/run.py [--quick] [--cache-dir DIR]

The first server process finds an empty cache and compiles every bucket at start-up; the second
loads them. Each time is measured from starting the process to the first answered request. The
servers listen on 127.0.0.1 on a free port and are stopped (SIGTERM, then SIGKILL after 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
REQUESTS = [["a wonderful, moving film"], ["dull", "not bad at all", "the plot made no sense", "fine"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, cache_dir: str | None, quick: bool, log_path: str, env: dict | None = None) -> subprocess.Popen:
    """The server on 127.0.0.1:port (``cache_dir`` None: the cache the environment names)."""
    cmd = [sys.executable, APP, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--cache-dir", cache_dir] if cache_dir else []
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd + (["--quick"] if quick else []), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


def request(port: int, path: str, payload: dict | None = None, timeout: float = 30) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def first_response(proc: subprocess.Popen, port: int, payload: dict, t0: float, timeout: float = 180):
    """(seconds from t0 to the first answered request, its answer)."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before answering")
        try:
            answer = request(port, "/classify", payload)
            return time.perf_counter() - t0, answer
        except (urllib.error.URLError, ConnectionError):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no answer from port {port} in {timeout:.0f}s") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def serve_once(cache_dir: str | None, quick: bool, log_path: str, env: dict | None = None, probe=None) -> dict:
    """Start a server, time its first response, send REQUESTS, read /stats, (``probe(port)``,) stop it."""
    port = free_port()
    t0 = time.perf_counter()
    proc = start(port, cache_dir, quick, log_path, env)
    try:
        ttfr, _ = first_response(proc, port, {"texts": REQUESTS[0]}, t0)
        answers = [request(port, "/classify", {"texts": texts}) for texts in REQUESTS]
        stats = request(port, "/stats")
        if probe is not None:
            probe(port)
    finally:
        stop(proc)
    return {"ttfr_s": ttfr, "answers": answers, "stats": stats}


def same(a: list, b: list, tol: float = 1e-5) -> bool:
    return all(x["labels"] == y["labels"] and all(abs(p - q) <= tol for r, s in zip(x["scores"], y["scores"])
                                                  for p, q in zip(r, s))
               for x, y in zip(a, b)) and len(a) == len(b)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and two buckets (for tests)")
    p.add_argument("--cache-dir", help="jitfreeze cache directory (default: a new temporary one)")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="jitfreeze-service-")
    cache_dir = args.cache_dir or os.path.join(work, "cache")
    log_path = os.path.join(work, "server.log")
    cold = serve_once(cache_dir, args.quick, log_path)
    warm = serve_once(cache_dir, args.quick, log_path)
    for label, r in (("cold (empty cache)", cold), ("warm (restart)", warm)):
        info = r["stats"]["cache_info"]
        print(f"{label:20s} time to first response {r['ttfr_s']:6.2f} s  "
              f"(compiled {info['compiles']}, loaded {info['loads']})")
    equal = same(cold["answers"], warm["answers"])
    print(f"warm/cold: {warm['ttfr_s'] / cold['ttfr_s']:.2f}; responses equal across the restart: {equal}")
    result = {"cold": cold, "warm": warm, "responses_equal": equal, "log": log_path}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

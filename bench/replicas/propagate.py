#!/usr/bin/env python3
"""Propagation delay between two keyward replicas (bench/replicas/run.sh).

For each rotation: rotate SECRET through replica A's admin API with a new
random value; as soon as A's response is read, poll replica B's
`GET /v1/resolve/SECRET` back to back (no sleep) on one keep-alive TLS
connection until B returns the new value. The delay is the time from A's
response to B's first fresh answer; it includes that answer's round trip.
Before each rotation one resolve on B is timed with nothing changed: that
baseline (a resolve's own round trip, audit commit included) is the floor.

Python 3 standard library only. Writes one TSV row per rotation to --tsv and
prints a one-line JSON summary on stdout. Exit status 1 if a check failed
(non-200, a value that is neither the old nor the new one, a version that
does not match, or B still stale after --give-up seconds).
"""

import argparse
import http.client
import json
import secrets
import socket
import ssl
import sys
import time
import urllib.parse


class Conn:
    """One persistent HTTPS connection, reopened if the server closes it."""

    def __init__(self, url, ctx):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.ctx = u.hostname, u.port, ctx
        self.c = None
        self.reconnects = 0

    def request(self, method, path, headers, body=None):
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=10)
                self.c.connect()
                self.c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.c.request(method, path, body=body, headers=headers)
                r = self.c.getresponse()
                data = r.read()
                return r.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                self.c.close()
                self.c = None
                self.reconnects += 1
                if attempt == 1:
                    raise


def pct(sorted_vals, p):
    """Nearest-rank percentile."""
    if not sorted_vals:
        return float("nan")
    k = max(1, -(-len(sorted_vals) * p // 100))  # ceil(n * p / 100)
    return sorted_vals[int(k) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="replica A base URL (rotations)")
    ap.add_argument("--b", required=True, help="replica B base URL (resolves)")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--admin", required=True, help="kwu_ admin token")
    ap.add_argument("--agent", required=True, help="kwa_ agent token")
    ap.add_argument("--secret", required=True)
    ap.add_argument("--org", default="default")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--give-up", type=float, default=10.0, help="seconds before a rotation counts as lost")
    ap.add_argument("--tsv", required=True)
    args = ap.parse_args()

    ctx = ssl.create_default_context(cafile=args.ca)
    a = Conn(args.a, ctx)
    b = Conn(args.b, ctx)
    rot_path = f"/v1/orgs/{args.org}/secrets/{args.secret}/rotate"
    res_path = f"/v1/resolve/{args.secret}"
    a_hdrs = {"Authorization": f"Bearer {args.admin}", "Content-Type": "application/json"}
    b_hdrs = {"Authorization": f"Bearer {args.agent}", "X-Keyward-Purpose": "bench-propagation"}
    errors = []

    def resolve_b():
        st, body = b.request("GET", res_path, b_hdrs)
        if st != 200:
            raise RuntimeError(f"B resolve returned HTTP {st}: {body[:300]!r}")
        d = json.loads(body)
        return d["value"], d["version"]

    # Start from what B currently serves (this also warms B's caches).
    old_value, old_version = resolve_b()

    delays, polls_list, rot_ms, base_ms = [], [], [], []
    stale_total = 0
    with open(args.tsv, "w") as tsv:
        tsv.write("i\tversion\tbaseline_ms\trotate_ms\tdelay_ms\tpolls\n")
        for i in range(1, args.n + 1):
            # Baseline: one resolve on B with nothing changed (the floor of the delay).
            tb = time.perf_counter()
            value, version = resolve_b()
            base_ms.append((time.perf_counter() - tb) * 1000)
            if value != old_value or version != old_version:
                errors.append(f"rotation {i}: before rotating, B served version {version}, expected {old_version}")
            new_value = "sk-prop-" + secrets.token_hex(16)
            body = json.dumps({"value": new_value}).encode()
            t_req = time.perf_counter()
            st, rbody = a.request("POST", rot_path, a_hdrs, body)
            t0 = time.perf_counter()
            if st != 200:
                errors.append(f"rotation {i}: A returned HTTP {st}: {rbody[:300]!r}")
                break
            new_version = json.loads(rbody)["current_version"]
            if new_version != old_version + 1:
                errors.append(f"rotation {i}: A reported version {new_version}, expected {old_version + 1}")
            polls = 0
            while True:
                value, version = resolve_b()
                polls += 1
                t1 = time.perf_counter()
                if value == new_value:
                    if version != new_version:
                        errors.append(f"rotation {i}: B served the new value as version {version}, A said {new_version}")
                    break
                if value != old_value or version != old_version:
                    errors.append(f"rotation {i}: B served version {version} with an unexpected value "
                                  f"(old version {old_version}, new {new_version})")
                    break
                stale_total += 1
                if t1 - t0 > args.give_up:
                    errors.append(f"rotation {i}: B still served version {old_version} {args.give_up}s after A answered")
                    break
            delay_ms = (t1 - t0) * 1000
            delays.append(delay_ms)
            polls_list.append(polls)
            rot_ms.append((t0 - t_req) * 1000)
            tsv.write(f"{i}\t{new_version}\t{base_ms[-1]:.3f}\t{rot_ms[-1]:.3f}\t{delay_ms:.3f}\t{polls}\n")
            old_value, old_version = new_value, new_version
            if len(errors) > 20:
                break

    s = sorted(delays)
    r = sorted(rot_ms)
    summary = {
        "rotations": len(delays),
        "p50_ms": round(pct(s, 50), 3),
        "p99_ms": round(pct(s, 99), 3),
        "max_ms": round(s[-1], 3) if s else None,
        "min_ms": round(s[0], 3) if s else None,
        "over_1s": sum(1 for d in delays if d > 1000),
        "fresh_on_first_poll": sum(1 for p in polls_list if p == 1),
        "max_polls": max(polls_list) if polls_list else 0,
        "stale_answers": stale_total,
        "baseline_p50_ms": round(pct(sorted(base_ms), 50), 3),
        "baseline_p99_ms": round(pct(sorted(base_ms), 99), 3),
        "rotate_p50_ms": round(pct(r, 50), 3),
        "rotate_p99_ms": round(pct(r, 99), 3),
        "reconnects": a.reconnects + b.reconnects,
        "errors": errors,
    }
    print(json.dumps(summary))
    for e in errors:
        print("error: " + e, file=sys.stderr)
    return 1 if errors or len(delays) < args.n else 0


if __name__ == "__main__":
    sys.exit(main())

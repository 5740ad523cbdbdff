#!/usr/bin/python3
"""Poll a service lookup and log what it returns, to time a worker's absence.

    lookup_poller.py URL OUT [--interval S] [--duration S]

Runs inside the appliance test container with the system python3 (standard library only)
while the package is upgraded: every ``interval`` seconds it GETs ``URL`` (an agent's
``/api/services/<name>``) and appends one JSON line to ``OUT``:
``{"t": <CLOCK_MONOTONIC seconds>, "workers": [[id, age_s], ...]}`` (``"error"`` instead of
workers when the request failed). CLOCK_MONOTONIC is the clock systemd's
``*TimestampMonotonic`` properties use, so the test can line the samples up with the
unit's restart. Bounded: it stops after ``duration`` seconds.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("out")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--duration", type=float, default=120.0)
    args = ap.parse_args()
    end = time.monotonic() + args.duration
    with open(args.out, "a", buffering=1) as out:
        while time.monotonic() < end:
            t = time.monotonic()
            line: dict[str, object] = {"t": t}
            try:
                with urllib.request.urlopen(args.url, timeout=2) as r:
                    data = json.load(r)
                workers = data.get("workers", []) if isinstance(data, dict) else data
                line["workers"] = [[w.get("id"), w.get("age_s")] for w in workers]
            except Exception as exc:  # a failed poll is a sample too
                line["error"] = repr(exc)[:200]
            out.write(json.dumps(line) + "\n")
            time.sleep(max(0.0, args.interval - (time.monotonic() - t)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``rma-agent demo`` end to end: real agent processes, lookups printed, clean stop."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.util import REPO, agent_cmd, wait_for

READY_LINE = "press Ctrl-C to stop"


def _reader(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _procs_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (the demo's temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(d.name))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_end_to_end_and_clean_stop(sig):
    proc = subprocess.Popen(agent_cmd("demo", "--workers", "3"), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 150
        while not any(READY_LINE in ln for ln in lines):
            assert time.monotonic() < deadline, "demo not ready:\n" + "".join(lines)
            try:
                line = q.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, ("demo exited early:\n" + "".join(lines)
                                      + proc.stderr.read())
            lines.append(line)
        out = "".join(lines)
        tmp = re.search(r"files in (\S+?)\)", out).group(1)
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
        # one worker was killed mid-burst on purpose; the other three agents run
        assert len(pids) == 3 and Path(tmp).is_dir()
        assert out.count("(killed by the demo)") == 1
        assert len(_procs_mentioning(tmp)) == 3
        # the routed bursts: every request answered 200, also while a worker was killed
        assert "120 of 120 answered 200" in out, out
        assert "300 of 300 answered 200" in out, out
        assert "no request failed" in out and "killed worker-" in out
        # one lookup per service, every worker found (3 workers: H100, A100, RTX 4090)
        assert "llm-inference: 2 workers, best first" in out
        assert "ocr: 2 workers, best first" in out
        assert "embeddings: 1 worker, best first" in out
        for gpu in ("H100", "A100", "RTX 4090"):
            assert gpu in out
        assert "/api/dht/stats" in out and "/metrics" in out
        # through the coordinator's real DHT node: cached lookups cost no DHT query
        coord = re.search(r"coordinator\s+(http://127\.0\.0\.1:\d+)", out).group(1)
        assert f"dashboard:  {coord}/" in out
        # (the bursts moved the workers' loads: their re-announcements may have
        # invalidated the cached answer once more; wait until it is cached again)
        wait_for(lambda: _get(coord + "/api/services/llm-inference")["source"] == "cache",
                 20, 0.5, "a cached llm-inference answer")
        before = _get(coord + "/api/dht/stats")
        for _ in range(5):
            answer = _get(coord + "/api/services/llm-inference")
            assert answer["source"] == "cache" and len(answer["workers"]) == 2
        after = _get(coord + "/api/dht/stats")
        assert after["lookups"]["total"] == before["lookups"]["total"]
        assert (after["discovery"]["by_source"]["cache"]
                == before["discovery"]["by_source"]["cache"] + 5)
        proc.send_signal(sig)
        rc = proc.wait(30)
        rest = []
        while (line := q.get(timeout=5)) is not None:
            rest.append(line)
        assert rc == 0, "".join(rest) + proc.stderr.read()
        assert "stopped 4 agents" in "".join(rest)
        assert not Path(tmp).exists()
        assert _procs_mentioning(tmp) == []
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

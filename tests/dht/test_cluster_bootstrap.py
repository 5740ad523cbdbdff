"""Seed resolution and the routing snapshot (agent/dht/bootstrap.py), in process."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.dht import bootstrap as b


@pytest.mark.parametrize(("entry", "want"), [
    ("10.0.0.1:8468", ("10.0.0.1", 8468)),
    ("seed.example.org:9000", ("seed.example.org", 9000)),
    ("seed.example.org", ("seed.example.org", 8468)),
    ("[::1]:7000", ("::1", 7000)),
    ("[::1]", ("::1", 8468)),
    ("fe80::1", ("fe80::1", 8468)),
])
def test_parse_hostport(entry: str, want: tuple[str, int]) -> None:
    assert b.parse_hostport(entry) == want


@pytest.mark.parametrize("entry", ["", "host:", "host:abc", "host:0", "host:70000", "[::1",
                                   "[::1]x", ":80"])
def test_parse_hostport_rejects(entry: str) -> None:
    with pytest.raises(b.SeedError):
        b.parse_hostport(entry)


async def test_resolve_names_literals_and_failures() -> None:
    res = await b.resolve_seeds(["127.0.0.1:4000", "localhost:4001", "127.0.0.1:4000",
                                 "no-such-host.invalid:1", "bad:port"])
    assert ("127.0.0.1", 4000) in res.addrs
    assert ("127.0.0.1", 4001) in res.addrs            # the name was resolved to an IP
    assert res.addrs.count(("127.0.0.1", 4000)) == 1   # duplicates collapse
    assert len(res.failures) == 2
    assert any("no-such-host.invalid" in f for f in res.failures)
    assert any("bad:port" in f for f in res.failures)


async def test_resolve_excludes_own_address() -> None:
    own = b.self_addresses("0.0.0.0", 8468)
    res = await b.resolve_seeds(["127.0.0.1:8468", "127.0.0.2:8468"], exclude=own)
    assert res.addrs == [("127.0.0.2", 8468)]


async def test_resolve_bootstrap_url() -> None:
    calls = []

    async def seeds(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.path.endswith("/list"):
            return web.json_response(["127.0.0.5:1111", "localhost:2222", 7, "https://x/y"])
        if request.path.endswith("/garbage"):
            return web.Response(text="<html>")
        if request.path.endswith("/wrongshape"):
            return web.json_response({"nodes": []})
        return web.json_response({"seeds": ["127.0.0.6:3333"]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", seeds)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"
        res = await b.resolve_seeds([f"{base}/api/dht/bootstrap", f"{base}/list",
                                     f"{base}/garbage", f"{base}/wrongshape",
                                     "http://127.0.0.1:1/api/dht/bootstrap"])
    finally:
        await server.close()
    assert sorted(res.addrs) == [("127.0.0.1", 2222), ("127.0.0.5", 1111), ("127.0.0.6", 3333)]
    assert len(res.failures) == 3, res.failures    # not JSON, wrong shape, refused
    assert len(calls) == 4                          # no recursion into the URL inside a list


def test_snapshot_roundtrip_and_atomic(tmp_path) -> None:
    assert b.load_snapshot(tmp_path) == []
    contacts = [("aa" * 20, "127.0.0.7", 4000), ("bb" * 20, "127.0.0.8", 4001)]
    path = b.save_snapshot(tmp_path, "cc" * 20, contacts)
    assert path == tmp_path / "routing.json"
    assert b.load_snapshot(tmp_path) == [("127.0.0.7", 4000), ("127.0.0.8", 4001)]
    assert [p.name for p in tmp_path.iterdir()] == ["routing.json"]   # no temp file left
    data = json.loads(path.read_text())
    assert data["node_id"] == "cc" * 20 and len(data["contacts"]) == 2


@pytest.mark.parametrize("text", ["", "{", "[]", '{"contacts": 5}', '{"contacts": [{"ip": 1}]}'])
def test_malformed_snapshot_is_ignored(tmp_path, text: str) -> None:
    (tmp_path / "routing.json").write_text(text)
    assert b.load_snapshot(tmp_path) == []


def test_snapshot_skips_invalid_entries(tmp_path) -> None:
    (tmp_path / "routing.json").write_text(json.dumps({"contacts": [
        {"id": "x", "ip": "not-an-ip", "port": 1}, {"id": "y", "ip": "127.0.0.9", "port": 0},
        {"id": "z", "ip": "127.0.0.9", "port": 5}]}))
    assert b.load_snapshot(tmp_path) == [("127.0.0.9", 5)]


def test_unreadable_snapshot_is_not_fatal(tmp_path, caplog) -> None:
    p = tmp_path / "routing.json"
    p.write_text(json.dumps({"contacts": [{"id": "z", "ip": "127.0.0.9", "port": 5}]}))
    p.chmod(0)
    if os.geteuid() != 0:
        with caplog.at_level("WARNING"):
            assert b.load_snapshot(tmp_path) == []
        assert "cannot read routing snapshot" in caplog.text
        return
    # root reads any file whatever its mode (and CI runs as root): read it as an
    # unprivileged user instead, in a forked child (the interpreter lives under /root,
    # which nobody may enter, so a fresh process as nobody could not start). tmp_path's
    # parents are root's 0700, so the file goes to a directory nobody may enter: its own
    # mode is then what stops the read. It names a valid seed: were it read, the child
    # would return it and fail.
    state = Path(tempfile.mkdtemp(prefix="rma-snapshot-"))
    try:
        state.chmod(0o755)
        shutil.copy(p, state / "routing.json")
        (state / "routing.json").chmod(0)
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = 0 if b.load_snapshot(state) == [] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        shutil.rmtree(state)
    assert os.waitstatus_to_exitcode(status) == 0

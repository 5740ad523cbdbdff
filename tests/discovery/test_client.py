"""``rma-agent status`` / ``lookup`` helpers against the agent's real HTTP app."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.cli.common import table
from agent.cli.lookup import cmd_lookup, format_lookup
from agent.cli.status import cmd_status
from agent.httpapi import make_app
from tests.discovery._support import make_discovery, make_record
from tests.util import free_port


@pytest.fixture
async def served():
    agent, comp, dht = make_discovery(region="eu-west")
    comp.prober.top = 0
    dht.add(make_record(name="big", gpu="H100", load=0.0, capacity=8))
    dht.add(make_record(name="small", gpu="T4", load=3.0, capacity=4, region="us-east"))
    client = TestClient(TestServer(make_app(agent), host="127.0.0.1"))
    await client.start_server()
    await comp.start()
    try:
        yield str(client.make_url("")).rstrip("/")
    finally:
        await comp.stop()
        await client.close()


async def run(fn, *args, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(fn, *args, out=out, err=err, **kw)
    return code, out.getvalue(), err.getvalue()


async def test_lookup_table_and_json(served):
    code, out, err = await run(cmd_lookup, served, "ocr", 10, False)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "ocr: 2 workers, best first (source: dht)"
    assert lines[1].split()[:4] == ["#", "name", "id", "gpu"]
    assert {ln.split()[1] for ln in lines[3:5]} == {"big", "small"}
    code, out, _ = await run(cmd_lookup, served, "ocr", 1, True, region="us-east")
    data = json.loads(out)
    assert code == 0 and [w["name"] for w in data["workers"]] == ["small"]
    code, out, _ = await run(cmd_lookup, served, "nobody", 5, False)
    assert code == 0 and "no workers serve 'nobody'" in out


async def test_lookup_bad_input_is_exit_2(served):
    code, out, err = await run(cmd_lookup, served, "Bad Name", 5, False)
    assert code == 2 and out == "" and "bad service name" in err
    code, _, err = await run(cmd_lookup, served, "ocr", 5, False, gpu="x" * 100)
    assert code == 2 and "gpu must be" in err and "HTTP 400" in err


async def test_status_table_and_json(served):
    code, out, err = await run(cmd_status, served, False)
    assert code == 0 and err == ""
    rows = dict(ln.split(None, 1) if " " in ln else (ln, "") for ln in out.splitlines())
    assert rows["role"].strip() == "worker" and rows["name"].strip() == "test"
    assert "service lookups" in out and "kernels" in out
    code, out, _ = await run(cmd_status, served, True)
    assert code == 0 and json.loads(out)["role"] == "worker"


def test_connection_refused_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    for fn, args in ((cmd_status, (url, False)), (cmd_lookup, (url, "ocr", 5, False))):
        out, err = io.StringIO(), io.StringIO()
        assert fn(*args, out=out, err=err) == 1
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and "connection refused" in lines[0] and url in lines[0]
        assert out.getvalue() == ""


def test_table_and_draw_note():
    t = table(("a", "bb"), [(1, None), (22, "x")], right=(0,))
    assert t.splitlines() == [" a  bb", "--  --", " 1  -", "22  x"]
    text = format_lookup({"service": "ocr", "source": "cache", "workers": [
        {"name": "a", "score": 0.5}, {"name": "b", "score": 0.9}]})
    assert "drawn at random among the best three" in text
    text = format_lookup({"service": "ocr", "source": "cache", "workers": [
        {"name": "a", "score": 0.9}, {"name": "b", "score": 0.5}]})
    assert "drawn" not in text


def test_a_stale_answer_says_how_old_it_is():
    """Discovery's last-known-good copy comes with its age (``age_s``); the table named
    the source "stale" but not how old the copy was."""
    text = format_lookup({"service": "ocr", "source": "stale", "age_s": 612.4, "workers": [
        {"name": "a", "score": 0.9}]})
    head = text.splitlines()[0]
    assert "(source: stale)" in head and "from 612 s ago" in head, head
    text = format_lookup({"service": "ocr", "source": "dht", "workers": [{"name": "a"}]})
    assert "ago" not in text.splitlines()[0]


@pytest.mark.parametrize("command", ["lookup", "explain", "watch", "call"])
def test_every_command_applies_the_one_service_rule(command):
    """A bad name is exit 2 with the rule, before anything is contacted (the URL points
    nowhere); an uppercase name is lowercased, not refused."""
    from agent.cli.call import cmd_call
    from agent.cli.common import cli_service
    from agent.cli.lookup import cmd_lookup_explain
    from agent.cli.watch import cmd_watch

    nowhere = "http://127.0.0.1:9"
    calls = {
        "lookup": lambda s, err: cmd_lookup(nowhere, s, 5, False, out=io.StringIO(), err=err),
        "explain": lambda s, err: cmd_lookup_explain(nowhere, s, 5, False, out=io.StringIO(),
                                                     err=err),
        "watch": lambda s, err: cmd_watch(nowhere, s, out=io.StringIO(), err=err),
        "call": lambda s, err: cmd_call(nowhere, s, "/x", out=io.BytesIO(), err=err),
    }
    err = io.StringIO()
    assert calls[command]("-bad name", err) == 2
    assert "bad service name '-bad name'" in err.getvalue()
    assert "lowercase a-z" in err.getvalue()
    assert cli_service(command, " OCR ", io.StringIO()) == "ocr"

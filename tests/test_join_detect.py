"""``rma-agent join`` finds inference servers by their answers on local ports.

Stub servers on free loopback ports answer what each kind answers (vLLM's /version and
/v1/models, Triton's /v2, llama.cpp's /props, TGI's /info, Ollama's /api/version); a
port serving something else (an rma-agent's admin API) and a closed port are not
offered. The port table is the ``ports`` argument, as the default table's ports (8000,
8080, 3000, 11434) may be taken on a shared machine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from agent.cli.join_detect import ALL_KINDS, DEFAULT_PORTS, detect, probe_url
from tests.util import PageServer, free_port

ANSWERS: dict[str, dict[str, object]] = {
    "vllm": {"/version": {"version": "0.6.3"},
             "/v1/models": {"object": "list", "data": [{"id": "meta-llama/Llama-3-8B",
                                                         "owned_by": "vllm"}]}},
    "triton": {"/v2": {"name": "triton", "version": "2.50.0", "extensions": []}},
    "llamacpp": {"/props": {"default_generation_settings": {}, "total_slots": 1,
                            "model_path": "/models/q4.gguf"}},
    "tgi": {"/info": {"model_id": "bigscience/bloom-560m", "version": "2.4.0"}},
    "ollama": {"/api/version": {"version": "0.4.1"}},
    "agent": {"/healthz": {"status": "ok", "uptime_s": 1.0}},
}


def _serve(answers: dict[str, object]) -> PageServer:
    return PageServer({path: json.dumps(body).encode() for path, body in answers.items()},
                      "application/json", json.dumps({"error": "not found"}).encode())


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, int]]:
    servers = {kind: _serve(a) for kind, a in ANSWERS.items()}
    yield {kind: s.port for kind, s in servers.items()}
    for s in servers.values():
        s.close()


def test_each_kind_is_found_on_the_port_its_table_names(stubs):
    # the default table's pairing: vllm/triton share a port, llamacpp/tgi share another
    ports = {stubs["vllm"]: DEFAULT_PORTS[8000], stubs["triton"]: DEFAULT_PORTS[8000],
             stubs["llamacpp"]: DEFAULT_PORTS[8080], stubs["tgi"]: DEFAULT_PORTS[3000],
             stubs["ollama"]: DEFAULT_PORTS[11434], stubs["agent"]: DEFAULT_PORTS[8080],
             free_port(): ALL_KINDS}
    found = asyncio.run(detect(ports))
    by_port = {int(f.url.rsplit(":", 1)[1]): f for f in found}
    assert {p: f.kind for p, f in by_port.items()} == {
        stubs[k]: k for k in ("vllm", "triton", "llamacpp", "tgi", "ollama")}
    assert "Llama-3-8B" in by_port[stubs["vllm"]].detail
    assert by_port[stubs["vllm"]].default_service == "llm-inference"
    assert by_port[stubs["triton"]].default_service == "triton"


def test_probe_of_a_given_url_tells_its_kind(stubs):
    found = asyncio.run(probe_url(f"http://127.0.0.1:{stubs['tgi']}"))
    assert found is not None and found.kind == "tgi"
    assert asyncio.run(probe_url(f"http://127.0.0.1:{stubs['agent']}")) is None
    assert asyncio.run(probe_url(f"http://127.0.0.1:{free_port()}")) is None

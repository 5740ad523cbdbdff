"""``[gateway.upstreams]`` entries with a ``kind``: what check-config accepts, the errors
it names (file, line, key, "did you mean"), and the dump that reads back the same."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import ConfigError, Upstream, dump_toml, load_config
from tests.util import agent_cmd, agent_env

W = '[worker]\nservices = ["llm", "cpp", "tri", "ol", "ocr"]\n[gateway.upstreams]\n'
GOOD = W + (
    'llm = { url = "http://127.0.0.1:8000/v1", kind = "vllm" }\n'
    'cpp = { url = "http://127.0.0.1:8080", kind = "llamacpp" }\n'
    'tri = { url = "http://127.0.0.1:8001", kind = "triton", '
    'metrics_url = "http://127.0.0.1:8002/metrics" }\n'
    'ol = { url = "http://127.0.0.1:11434", kind = "ollama" }\n'
    'ocr = "http://127.0.0.1:9000"\n')


def _errors(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    return [e.replace(str(p), "PATH") for e in ei.value.errors]


def test_kinds_are_read_and_dumped_back(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    ups = cfg.gateway.upstreams
    assert ups["llm"] == Upstream("http://127.0.0.1:8000/v1", kind="vllm")
    assert ups["cpp"].kind == "llamacpp" and ups["ocr"] == Upstream("http://127.0.0.1:9000")
    assert ups["tri"].metrics_url == "http://127.0.0.1:8002/metrics"
    dumped = dump_toml(cfg)
    assert 'kind = "vllm"' in dumped and 'ocr = "http://127.0.0.1:9000"' in dumped
    q = tmp_path / "again.toml"
    q.write_text(dumped)
    assert load_config(q).gateway == cfg.gateway


def test_check_config_accepts_and_names_the_kinds(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD)
    out = subprocess.run(agent_cmd("check-config", "-c", str(p)), env=agent_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "kinds=llm:vllm,cpp:llamacpp,tri:triton,ol:ollama" in out.stdout
    p.write_text(W + 'llm = { url = "http://127.0.0.1:8000", kind = "vlm" }\n'
                 'ocr = "http://127.0.0.1:9000"\n')
    out = subprocess.run(agent_cmd("check-config", "-c", str(p)), env=agent_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{p}:4: gateway.upstreams.llm.kind: unknown kind \"vlm\", did you mean " \
           "'vllm'?" in out.stderr


@pytest.mark.parametrize(("text", "error"), [
    ('llm = { url = "http://h:1", kind = "llama.cpp" }\n',
     "PATH:4: gateway.upstreams.llm.kind: unknown kind \"llama.cpp\", did you mean 'llamacpp'?"),
    ('llm = { url = "http://h:1", kind = "sglang" }\n',
     'PATH:4: gateway.upstreams.llm.kind: unknown kind "sglang" (known: generic, vllm, '
     'llamacpp, tgi, ollama, triton)'),
    ('llm = { url = "http://h:1", kind = 3 }\n',
     "PATH:4: gateway.upstreams.llm.kind: must be one of generic, vllm"),
    ('llm = { url = "http://h:1", knd = "vllm" }\n',
     "PATH:4: gateway.upstreams.llm.knd: unknown key, did you mean 'kind'?"),
    ('llm = { url = "http://h:1", kind = "vllm", metrics = "http://h:2/metrics" }\n',
     "PATH:4: gateway.upstreams.llm.metrics: unknown key, did you mean 'metrics_url'?"),
    ('llm = { url = "http://h:1", kind = "triton", metrics_url = "h:8002" }\n',
     "PATH:4: gateway.upstreams.llm.metrics_url: must start with http:// or https://"),
    ('llm = { url = "http://h:1", kind = "ollama", metrics_url = "http://h:2/m" }\n',
     "PATH:4: gateway.upstreams.llm.metrics_url: is only for the kinds whose load is "
     "Prometheus text"),
    ('llm = { url = "http://h:1", metrics_url = "http://h:2/m" }\n',
     "PATH:4: gateway.upstreams.llm.metrics_url: is only for the kinds whose load is "
     "Prometheus text (vllm, llamacpp, tgi, triton), not 'generic'"),
    ('[gateway.upstreams.llm]\nurl = "http://h:1"\nkind = "vllmm"\n',
     "PATH:5: gateway.upstreams.llm.kind: unknown kind \"vllmm\", did you mean 'vllm'?"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, error: str) -> None:
    head = '[worker]\nservices = ["llm"]\n' + ("" if text.startswith("[") else
                                                "[gateway.upstreams]\n")
    errors = _errors(tmp_path, head + text)
    assert len(errors) == 1 and errors[0].startswith(error), errors

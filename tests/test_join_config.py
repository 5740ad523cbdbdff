"""``rma-agent join``'s config file: what it writes, and when it may replace a file.

The rule (agent/cli/join_config.py): absent or the package's untouched default ->
written; join's own unedited file -> replaced (or left alone when identical: running
join twice changes nothing); edited or foreign -> refused (exit 2) unless --force,
which keeps a backup. And ``--service`` parsing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import join_config
from agent.cli.join import _listen, _local_ports, parse_service
from agent.cli.join_config import JoinError, JoinPlan, Upstream
from agent.config import load_config
from tests.util import REPO


def plan(tmp: Path, **kw: object) -> JoinPlan:
    base: dict[str, object] = dict(
        coordinator="https://coord-1.example.org", name="box-1",
        services={"ocr": Upstream("http://127.0.0.1:9000")}, state_dir=str(tmp / "state"),
        endpoint="https://box-1.example.org", tunnel="off")
    base.update(kw)
    return JoinPlan(**base)  # type: ignore[arg-type]


def test_written_config_loads_and_says_what_join_was_told(tmp_path):
    path = tmp_path / "agent.toml"
    p = plan(tmp_path, services={"ocr": Upstream("http://127.0.0.1:9000"),
                                 "llm-inference": Upstream("http://127.0.0.1:8000", "vllm",
                                                           "/health")})
    res = join_config.write_config(path, join_config.render(p, path), force=False)
    assert res.action == "written" and res.backup is None
    cfg = load_config(path)
    assert cfg.agent.role == "worker" and cfg.agent.name == "box-1"
    assert cfg.dht.bootstrap == ("https://coord-1.example.org/api/dht/bootstrap",)
    assert cfg.discovery.coordinators == ("https://coord-1.example.org",)
    assert cfg.worker.services == ("ocr", "llm-inference")
    assert cfg.worker.endpoint == "https://box-1.example.org" and cfg.tunnel.mode == "off"
    llm = cfg.gateway.upstreams["llm-inference"]
    assert llm.url == "http://127.0.0.1:8000"
    if join_config.kind_supported():
        assert llm.kind == "vllm"          # type: ignore[attr-defined]
    else:
        assert llm.health == "/health"     # the kind's health path stands in for it
    assert join_config.ownership(path) == "ours"


def test_second_run_changes_nothing(tmp_path):
    path = tmp_path / "agent.toml"
    text = join_config.render(plan(tmp_path), path)
    join_config.write_config(path, text, force=False)
    before = path.stat()
    res = join_config.write_config(path, join_config.render(plan(tmp_path), path), force=False)
    assert res.action == "unchanged"
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_new_arguments_replace_joins_own_unedited_file(tmp_path):
    path = tmp_path / "agent.toml"
    join_config.write_config(path, join_config.render(plan(tmp_path), path), force=False)
    res = join_config.write_config(path, join_config.render(plan(tmp_path, name="box-2"), path),
                                   force=False)
    assert res.action == "replaced" and res.backup is None
    assert load_config(path).agent.name == "box-2"


def test_edited_file_is_refused_then_replaced_with_force_keeping_a_backup(tmp_path):
    path = tmp_path / "agent.toml"
    join_config.write_config(path, join_config.render(plan(tmp_path), path), force=False)
    edited = path.read_text().replace('region = ""', 'region = "eu-west"')
    assert edited != path.read_text()
    path.write_text(edited)
    assert join_config.ownership(path) == "edited"
    new = join_config.render(plan(tmp_path, name="box-3"), path)
    with pytest.raises(JoinError) as exc:
        join_config.write_config(path, new, force=False)
    assert exc.value.code == 2 and "--force" in str(exc.value)
    assert path.read_text() == edited                       # untouched
    res = join_config.write_config(path, new, force=True)
    assert res.action == "replaced" and res.backup is not None
    assert res.backup.read_text() == edited
    assert path.read_text() == new and join_config.ownership(path) == "ours"


def test_foreign_file_is_refused_but_the_packaged_default_is_replaced(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nrole = "coordinator"\n')
    assert join_config.ownership(path) == "foreign"
    text = join_config.render(plan(tmp_path), path)
    with pytest.raises(JoinError):
        join_config.write_config(path, text, force=False)
    path.write_bytes((REPO / "config" / "agent.toml").read_bytes())    # what apt put there
    assert join_config.ownership(path) == "default"
    assert join_config.write_config(path, text, force=False).action == "replaced"


def test_an_invalid_config_is_never_written(tmp_path):
    path = tmp_path / "agent.toml"
    bad = join_config.render(plan(tmp_path, endpoint="https://x", tunnel="quick"), path)
    with pytest.raises(JoinError) as exc:       # endpoint together with a tunnel: invalid
        join_config.write_config(path, bad, force=False)
    assert exc.value.code == 2 and "worker.endpoint" in str(exc.value)
    assert not path.exists()


@pytest.mark.parametrize(("text", "name", "kind", "url"), [
    ("ocr=http://127.0.0.1:9000", "ocr", "", "http://127.0.0.1:9000"),
    ("LLM=vllm+http://127.0.0.1:8000/", "llm", "vllm", "http://127.0.0.1:8000"),
    ("chat=ollama+http://127.0.0.1:11434", "chat", "ollama", "http://127.0.0.1:11434"),
])
def test_service_argument(text, name, kind, url):
    got_name, up = parse_service(text)
    assert (got_name, up.kind, up.url) == (name, kind, url)


@pytest.mark.parametrize("text", ["ocr", "=http://x", "ocr=ftp://x", "ocr=nope+http://x",
                                  "b@d=http://127.0.0.1:1"])
def test_bad_service_argument_is_usage_error(text):
    with pytest.raises(JoinError) as exc:
        parse_service(text)
    assert exc.value.code == 2


def test_admin_port_moves_off_an_inference_servers_port():
    # llama.cpp / TGI default to 8080, the admin API's default: the agent takes 8081
    taken = _local_ports({"llm-inference": Upstream("http://127.0.0.1:8080", "llamacpp"),
                          "ocr": Upstream("http://10.0.0.5:8090")})
    assert taken == {8080}
    assert _listen(None, 8080, taken) == "127.0.0.1:8081"
    assert _listen(None, 8090, taken | {8081}) == "127.0.0.1:8090"
    assert _listen("127.0.0.1:9999", 8080, taken) == "127.0.0.1:9999"   # given: kept

"""Tests of the config loader (SPEC §4): every bad input gives the exact
``PATH:LINE: section.key: message`` line the user sees, all errors at once."""

from __future__ import annotations

import base64
import os
import re
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import (
    DEFAULT_GPU_SCORES,
    Address,
    Config,
    ConfigError,
    Upstream,
    dump_toml,
    load_config,
    parse_address,
    parse_config,
    summary,
)

REPO = Path(__file__).resolve().parent.parent
W = '[worker]\nservices = ["ocr"]\n'          # makes a minimal worker config valid
KEY = base64.b64encode(bytes(range(32))).decode()   # a well-formed admission key
KEY2 = base64.b64encode(bytes(range(1, 33))).decode()


def _errors(tmp_path: Path, text: str | bytes, name: str = "agent.toml") -> list[str]:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == "\n".join(ei.value.errors)
    return [e.replace(str(p), "PATH") for e in ei.value.errors]


# (id, config text, exact prefix of the single error line; PATH stands for the file)
BAD: list[tuple[str, str, str]] = [
    # wrong types
    ("ksize-string", W + '[dht]\nksize = "20"\n',
     'PATH:4: dht.ksize: must be an integer between 1 and 64, got "20"'),
    ("ksize-float", W + "[dht]\nksize = 20.0\n",
     "PATH:4: dht.ksize: must be an integer between 1 and 64, got 20.0 (a float)"),
    ("bool-as-int", W + "[dht]\nalpha = true\n",
     "PATH:4: dht.alpha: must be an integer between 1 and 16, got true (a boolean)"),
    ("bool-as-int-cache", W + "[discovery]\ncache_ttl = false\n",
     "PATH:4: discovery.cache_ttl: must be an integer between 0 and 3600, got false (a boolean)"),
    ("name-int", W + "[agent]\nname = 5\n",
     "PATH:4: agent.name: must be a string, got 5 (an integer)"),
    ("services-string", '[worker]\nservices = "ocr"\n',
     'PATH:2: worker.services: must be an array of strings, e.g. ["ocr"], got "ocr"'),
    ("services-int-entry", '[worker]\nservices = ["ocr", 7]\n',
     "PATH:2: worker.services: entry 2 must be a string, got 7 (an integer)"),
    ("section-not-table", "dht = 5\n" + W,
     "PATH:1: dht: must be a table ([dht]), got 5 (an integer)"),
    ("gpu-memory-bool", '[worker]\nservices = ["ocr"]\ngpu_memory_gb = true\n',
     "PATH:3: worker.gpu_memory_gb: must be a number >= 0, got true (a boolean)"),
    ("array-of-tables", '[[worker]]\nservices = ["ocr"]\n',
     "PATH:1: worker: must be a table ([worker]), got an array"),
    ("date-as-string", W + "[agent]\nname = 1979-05-27T07:32:00Z\n",
     "PATH:4: agent.name: must be a string, got 1979-05-27 07:32:00+00:00 (a date/time)"),
    ("listen-array", W + '[dht]\nlisten = ["0.0.0.0:8468"]\n',
     'PATH:4: dht.listen: must be a "host:port" string, got an array'),
    # ranges
    ("ksize-0", W + "[dht]\nksize = 0\n",
     "PATH:4: dht.ksize: must be an integer between 1 and 64, got 0"),
    ("ksize-65", W + "[dht]\nksize = 65\n",
     "PATH:4: dht.ksize: must be an integer between 1 and 64, got 65"),
    ("alpha-17", W + "[dht]\nalpha = 17\n",
     "PATH:4: dht.alpha: must be an integer between 1 and 16, got 17"),
    ("ttl-low", W + "[dht]\nrecord_ttl = 9\nrepublish_interval = 5\n",
     "PATH:4: dht.record_ttl: must be an integer between 10 and 3600, got 9"),
    ("ttl-beyond-record-limit", W + "[dht]\nrecord_ttl = 7200\n",
     "PATH:4: dht.record_ttl: must be an integer between 10 and 3600, got 7200"),
    ("too-many-services", "[worker]\nservices = [" + ", ".join(f'"s{i}"' for i in range(17)) + "]\n",
     "PATH:2: worker.services: at most 16 services fit in one signed record, got 17"),
    ("region-too-long", W + '[agent]\nregion = "' + "r" * 33 + '"\n',
     "PATH:4: agent.region: "),
    ("gpu-too-long", '[worker]\nservices = ["ocr"]\ngpu = "' + "G" * 33 + '"\n',
     "PATH:3: worker.gpu: "),
    ("endpoint-too-long", '[worker]\nservices = ["ocr"]\nendpoint = "https://' + "e" * 250 + '.org"\n',
     "PATH:3: worker.endpoint: "),
    ("republish-ge-ttl", W + "[dht]\nrecord_ttl = 60\nrepublish_interval = 60\n",
     "PATH:5: dht.republish_interval: must be less than dht.record_ttl (60), got 60"),
    ("ttl-below-default-republish", W + "[dht]\nrecord_ttl = 20\n",
     "PATH:4: dht.record_ttl: must be greater than dht.republish_interval (30), got 20"),
    ("republish-0", W + "[dht]\nrepublish_interval = 0\n",
     "PATH:4: dht.republish_interval: must be an integer >= 1, got 0"),
    ("cache-ttl", W + "[discovery]\ncache_ttl = 3601\n",
     "PATH:4: discovery.cache_ttl: must be an integer between 0 and 3600, got 3601"),
    ("max-results-0", W + "[discovery]\nmax_results = 0\n",
     "PATH:4: discovery.max_results: must be an integer between 1 and 1000, got 0"),
    ("max-concurrency-0", '[worker]\nservices = ["ocr"]\nmax_concurrency = 0\n',
     "PATH:3: worker.max_concurrency: must be an integer between 1 and 100000, got 0"),
    ("gpu-memory-neg", '[worker]\nservices = ["ocr"]\ngpu_memory_gb = -1\n',
     "PATH:3: worker.gpu_memory_gb: must be a number >= 0, got -1"),
    ("gpu-score-range", W + '[discovery.gpu_scores]\n"RTX 4090" = 1.5\n',
     'PATH:4: discovery.gpu_scores."RTX 4090": must be a number between 0 and 1, got 1.5'),
    ("gpu-score-inline", W + "[discovery]\ngpu_scores = { B200 = 1.0, X = \"a\" }\n",
     'PATH:4: discovery.gpu_scores.X: must be a number between 0 and 1, got "a"'),
    ("gpu-score-nan", W + "[discovery.gpu_scores]\nB200 = nan\n",
     "PATH:4: discovery.gpu_scores.B200: must be a number between 0 and 1, got nan"),
    ("port-0", W + '[http]\nlisten = "127.0.0.1:0"\n',
     'PATH:4: http.listen: the port must be a number between 1 and 65535, got "127.0.0.1:0"'),
    ("port-big", W + '[tunnel]\nmetrics = "127.0.0.1:65536"\n',
     'PATH:4: tunnel.metrics: the port must be a number between 1 and 65535, got "127.0.0.1:65536"'),
    # unknown keys and sections, with and without "did you mean"
    ("unknown-key-close", W + "[dht]\nksise = 20\n",
     "PATH:4: dht.ksise: unknown key, did you mean 'ksize'?"),
    ("unknown-key-far", W + "[dht]\nzzz = 1\n",
     "PATH:4: dht.zzz: unknown key (known: listen, bootstrap, mode, ksize, alpha, "
     "record_ttl, republish_interval)"),
    ("unknown-section", W + "[discovry]\ncache_ttl = 1\n",
     "PATH:3: discovry: unknown section, did you mean 'discovery'?"),
    ("unknown-top-key", "rol = 'worker'\n" + W,
     "PATH:1: rol: unknown key (known: agent, dht, http, gateway, worker, network, tunnel, "
     "discovery, log)"),
    ("unknown-dotted-key", "dht.ksizee = 3\n" + W,
     "PATH:1: dht.ksizee: unknown key, did you mean 'ksize'?"),
    ("key-in-wrong-section", '[dht]\nservices = ["ocr"]\n' + W,
     "PATH:2: dht.services: unknown key: 'services' belongs in [worker]"),
    ("key-at-top-level", 'role = "worker"\n' + W,
     "PATH:1: role: unknown key: 'role' belongs in [agent]"),
    # enums
    ("role", '[agent]\nrole = "wroker"\n' + W,
     'PATH:2: agent.role: must be one of "worker", "coordinator", got "wroker", did you mean \'worker\'?'),
    ("dht-mode", W + '[dht]\nmode = "peer"\n',
     'PATH:4: dht.mode: must be one of "server", "client", "auto", got "peer"'),
    ("tunnel-mode", W + '[tunnel]\nmode = "quik"\n',
     'PATH:4: tunnel.mode: must be one of "off", "quick", "named", got "quik", did you mean \'quick\'?'),
    ("log-level", W + '[log]\nlevel = "verbose"\n',
     'PATH:4: log.level: must be one of "debug", "info", "warning", "error", got "verbose"'),
    # addresses
    ("addr-no-port", W + '[dht]\nlisten = "0.0.0.0"\n',
     'PATH:4: dht.listen: must be "host:port", got "0.0.0.0"'),
    ("addr-bad-ipv4", W + '[dht]\nlisten = "300.1.1.1:8468"\n',
     "PATH:4: dht.listen: '300.1.1.1' is not a valid IPv4 address, got \"300.1.1.1:8468\""),
    ("addr-v6-no-brackets", W + '[dht]\nlisten = "::1:8468"\n',
     'PATH:4: dht.listen: an IPv6 address needs brackets: "[addr]:port", got "::1:8468"'),
    ("addr-bad-v6", W + '[http]\nlisten = "[::g]:80"\n',
     "PATH:4: http.listen: '::g' is not a valid IPv6 address, got \"[::g]:80\""),
    ("addr-bad-hostname", W + '[http]\nlisten = "bad_host:80"\n',
     "PATH:4: http.listen: 'bad_host' is not a valid host name, got \"bad_host:80\""),
    ("addr-not-string", W + "[http]\nlisten = 8080\n",
     'PATH:4: http.listen: must be a "host:port" string, got 8080 (an integer)'),
    ("bootstrap-bad-entry-multiline",
     W + '[dht]\nbootstrap = [\n  "198.51.100.7:8468",\n  "seed.example.org",\n]\n',
     'PATH:6: dht.bootstrap: entry 2 must be "host:port" or an http(s):// URL: must be '
     '"host:port", got "seed.example.org"'),
    ("bootstrap-ftp", W + '[dht]\nbootstrap = ["ftp://x.example.org/seeds"]\n',
     'PATH:4: dht.bootstrap: entry 1 must start with http:// or https://, got "ftp://x.example.org/seeds"'),
    ("bootstrap-dup", W + '[dht]\nbootstrap = ["10.0.0.1:8468",\n "10.0.0.1:8468"]\n',
     'PATH:5: dht.bootstrap: entry 2 is a duplicate of "10.0.0.1:8468"'),
    # URLs
    ("coordinator-no-scheme", W + '[discovery]\ncoordinators = ["coord-1.example.org"]\n',
     'PATH:4: discovery.coordinators: entry 1 must start with http:// or https://, got "coord-1.example.org"'),
    ("coordinator-no-host", W + '[discovery]\ncoordinators = ["https:///x"]\n',
     'PATH:4: discovery.coordinators: entry 1 has no host, got "https:///x"'),
    ("endpoint-bad", '[worker]\nservices = ["ocr"]\nendpoint = "gpu-box-1.example.org"\n',
     "PATH:3: worker.endpoint: must start with http:// or https:// (or leave it empty to use "
     "the tunnel's URL), got \"gpu-box-1.example.org\""),
    # service names
    ("service-upper", '[worker]\nservices = ["OCR"]\n',
     'PATH:2: worker.services: entry 1 must be a service name: 1-63 characters of a-z, 0-9, '
     '".", "_", "-", starting with a letter or digit, got "OCR", did you mean \'ocr\'?'),
    ("service-dup", '[worker]\nservices = [\n  "ocr",\n  "ocr",\n]\n',
     'PATH:4: worker.services: entry 2 is a duplicate of "ocr"'),
    ("service-too-long", f'[worker]\nservices = ["{"a" * 64}"]\n',
     "PATH:2: worker.services: entry 1 must be a service name"),
    # role rules
    ("worker-section-on-coordinator", '[agent]\nrole = "coordinator"\n\n[worker]\nservices = ["ocr"]\n',
     'PATH:4: worker: section is only for role = "worker" (agent.role is "coordinator")'),
    ("worker-no-services", '[worker]\nservices = []\n',
     'PATH:2: worker.services: a worker must serve at least one service, e.g. services = ["ocr"]'),
    ("worker-no-section", '[agent]\nrole = "worker"\n',
     'PATH:2: worker.services: a worker must serve at least one service'),
    ("named-needs-hostname", W + '[tunnel]\nmode = "named"\n',
     'PATH:4: tunnel.hostname: is required when tunnel.mode = "named"'),
    ("hostname-with-scheme", W + '[tunnel]\nmode = "named"\nhostname = "https://w.example.org"\n',
     'PATH:5: tunnel.hostname: must be a bare host name without scheme or path'),
    ("hostname-without-named", W + '[tunnel]\nmode = "quick"\nhostname = "w.example.org"\n',
     'PATH:5: tunnel.hostname: is only used with tunnel.mode = "named" (mode is "quick")'),
    ("endpoint-and-tunnel",
     '[worker]\nservices = ["ocr"]\nendpoint = "https://w.example.org"\n[tunnel]\nmode = "quick"\n',
     'PATH:3: worker.endpoint: is set while tunnel.mode = "quick": which public URL wins is ambiguous'),
    ("metrics-equals-http", W + '[http]\nlisten = "127.0.0.1:9000"\n[tunnel]\nmetrics = "127.0.0.1:9000"\n',
     "PATH:6: tunnel.metrics: must differ from http.listen (127.0.0.1:9000)"),
    ("empty-name", W + '[agent]\nname = ""\n', "PATH:4: agent.name: must not be empty"),
    # [gateway]
    ("gateway-listen-bad", W + '[gateway]\nlisten = "8090"\n',
     'PATH:4: gateway.listen: must be "host:port", got "8090"'),
    ("gateway-listen-is-admin", W + '[http]\nlisten = "127.0.0.1:9100"\n[gateway]\n'
     'listen = "0.0.0.0:9100"\n',
     "PATH:6: gateway.listen: must differ from http.listen (127.0.0.1:9100): the gateway is "
     "public, the admin API is not"),
    ("gateway-listen-is-metrics", W + '[gateway]\nlisten = "127.0.0.1:20241"\n',
     "PATH:4: gateway.listen: must differ from tunnel.metrics (127.0.0.1:20241)"),
    ("max-body-0", W + "[gateway]\nmax_body_mb = 0\n",
     "PATH:4: gateway.max_body_mb: must be an integer between 1 and 1048576, got 0"),
    ("max-body-float", W + "[gateway]\nmax_body_mb = 1.5\n",
     "PATH:4: gateway.max_body_mb: must be an integer between 1 and 1048576, got 1.5 (a float)"),
    ("upstream-timeout-0", W + "[gateway]\nupstream_timeout = 0\n",
     "PATH:4: gateway.upstream_timeout: must be a number of seconds > 0 and <= 86400, got 0"),
    ("upstream-timeout-string", W + '[gateway]\nupstream_timeout = "5s"\n',
     'PATH:4: gateway.upstream_timeout: must be a number between 0 and 86400, got "5s"'),
    ("upstreams-not-table", W + '[gateway]\nupstreams = "http://127.0.0.1:9000"\n',
     'PATH:4: gateway.upstreams: must be a table of service = URL'),
    ("upstream-unknown-service", W + '[gateway.upstreams]\nocr = "http://127.0.0.1:9000"\n'
     'ocrr = "http://127.0.0.1:9001"\n',
     "PATH:5: gateway.upstreams.ocrr: is not a service of this worker (worker.services: ocr), "
     "did you mean 'ocr'?"),
    ("upstream-no-scheme", W + '[gateway.upstreams]\nocr = "127.0.0.1:9000"\n',
     'PATH:4: gateway.upstreams.ocr: must start with http:// or https://, got "127.0.0.1:9000"'),
    ("upstream-query", W + '[gateway.upstreams]\nocr = "http://127.0.0.1:9000/?a=1"\n',
     'PATH:4: gateway.upstreams.ocr: must not contain a ?query'),
    ("upstream-int", W + "[gateway.upstreams]\nocr = 9000\n",
     "PATH:4: gateway.upstreams.ocr: must be an http(s) URL string"),
    ("upstream-table-no-url", W + '[gateway.upstreams]\nocr = { health = "/h" }\n',
     "PATH:4: gateway.upstreams.ocr: needs a url"),
    ("upstream-table-bad-url", W + '[gateway.upstreams]\nocr = { url = "ftp://x" }\n',
     'PATH:4: gateway.upstreams.ocr.url: must start with http:// or https://'),
    ("upstream-health-relative", W + '[gateway.upstreams]\n'
     'ocr = { url = "http://127.0.0.1:9000", health = "healthz" }\n',
     'PATH:4: gateway.upstreams.ocr.health: must be a path starting with "/"'),
    ("upstream-table-unknown-key", W + '[gateway.upstreams]\n'
     'ocr = { url = "http://127.0.0.1:9000", helth = "/h" }\n',
     "PATH:4: gateway.upstreams.ocr.helth: unknown key, did you mean 'health'?"),
    ("upstreams-on-coordinator", '[agent]\nrole = "coordinator"\n[gateway.upstreams]\n'
     'ocr = "http://127.0.0.1:9000"\n',
     'PATH:3: gateway.upstreams: is only for role = "worker"'),
    ("gateway-unknown-key", W + "[gateway]\nmax_body = 5\n",
     "PATH:4: gateway.max_body: unknown key, did you mean 'max_body_mb'?"),
    # [worker] admission_cert, [network]
    ("admission-cert-int", W + "admission_cert = 5\n",
     "PATH:3: worker.admission_cert: must be a string, got 5 (an integer)"),
    ("admission-keys-string", W + '[network]\nadmission_keys = "abc"\n',
     'PATH:4: network.admission_keys: must be an array of strings'),
    ("admission-key-not-b64", W + '[network]\nadmission_keys = [\n  "not base64!",\n]\n',
     "PATH:5: network.admission_keys: entry 1 must be the base64 of a 32-byte Ed25519 public "
     "key (from `rma-agent network-key create`); it is not base64"),
    ("admission-key-short", W + '[network]\nadmission_keys = ["' + "A" * 40 + '"]\n',
     "PATH:4: network.admission_keys: entry 1 must be the base64 of a 32-byte Ed25519 public "
     "key (from `rma-agent network-key create`); it decodes to 30 bytes"),
    ("admission-key-dup", W + '[network]\nadmission_keys = [\n  "' + KEY + '",\n  "' + KEY
     + '",\n]\n', "PATH:6: network.admission_keys: entry 2 is a duplicate of"),
    ("network-unknown-key", W + '[network]\nadmission_key = []\n',
     "PATH:4: network.admission_key: unknown key, did you mean 'admission_keys'?"),
    # [discovery] router keys
    ("max-attempts-0", W + "[discovery]\nmax_attempts = 0\n",
     "PATH:4: discovery.max_attempts: must be an integer between 1 and 10, got 0"),
    ("max-attempts-11", W + "[discovery]\nmax_attempts = 11\n",
     "PATH:4: discovery.max_attempts: must be an integer between 1 and 10, got 11"),
    ("allow-http-url", W + '[discovery]\nallow_http_hosts = ["http://10.0.0.1"]\n',
     "PATH:4: discovery.allow_http_hosts: entry 1 must be a host name or IP address without "
     "scheme or port"),
    ("allow-http-port", W + '[discovery]\nallow_http_hosts = [\n "lan-box",\n "10.0.0.1:80"]\n',
     "PATH:6: discovery.allow_http_hosts: entry 2 must be a host name or IP address"),
    ("allow-http-dup", W + '[discovery]\nallow_http_hosts = ["lan-box", "LAN-box"]\n',
     'PATH:4: discovery.allow_http_hosts: entry 2 is a duplicate of "lan-box"'),
    ("allow-http-int", W + "[discovery]\nallow_http_hosts = [1]\n",
     "PATH:4: discovery.allow_http_hosts: entry 1 must be a string, got 1 (an integer)"),
    ("allow-private-url", W + '[discovery]\nallow_private_hosts = ["http://10.0.0.1"]\n',
     "PATH:4: discovery.allow_private_hosts: entry 1 must be an IP address, a CIDR network or "
     "a host name"),
    ("allow-private-dup", W + '[discovery]\nallow_private_hosts = ["127.0.0.1/8", "127.0.0.0/8"]\n',
     'PATH:4: discovery.allow_private_hosts: entry 2 is a duplicate of "127.0.0.0/8"'),
    ("trusted-proxy-name", W + '[http]\ntrusted_proxies = ["cloudflared"]\n',
     "PATH:4: http.trusted_proxies: entry 1 must be an IP address or a CIDR network, got "
     '"cloudflared"'),
    # syntax
    ("duplicate-key", W + "[dht]\nksize = 3\nksize = 4\nalpha = 2\n",
     "PATH:5: syntax: Cannot overwrite a value (at line 5, column 10) - a key or table is defined twice"),
    ("duplicate-key-last-line", W + "[dht]\nksize = 3\nksize = 4",
     "PATH:5: syntax: Cannot overwrite a value (at end of document)"),
    ("duplicate-table", W + "[dht]\nksize = 3\n[dht]\nalpha = 2\n",
     "PATH:5: syntax: Cannot declare ('dht',) twice (at line 5, column 5)"),
    ("syntax-bare-word", W + "[dht]\nmode = auto\n",
     "PATH:4: syntax: Invalid value (at line 4, column 8)"),
    ("syntax-unterminated-string", W + '[agent]\nname = "x\nregion = "y"\n',
     "PATH:4: syntax: "),
    ("syntax-unclosed-array-eof", W + '[dht]\nbootstrap = [\n  "a:1",\n',
     "PATH:4: syntax: Invalid value (at end of document)"),
]


@pytest.mark.parametrize(("text", "prefix"), [(t, p) for _, t, p in BAD], ids=[i for i, _, _ in BAD])
def test_bad_config_reports_exact_line(tmp_path: Path, text: str, prefix: str) -> None:
    errors = _errors(tmp_path, text)
    assert len(errors) == 1, errors
    assert errors[0].startswith(prefix), errors[0]


def test_there_are_at_least_30_bad_cases() -> None:
    assert len(BAD) >= 30


def test_every_error_is_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    text = (
        "[agent]\n"                       # 1
        'role = "worker"\n'               # 2
        'nmae = "x"\n'                    # 3
        "[dht]\n"                         # 4
        "ksize = 0\n"                     # 5
        "alpha = true\n"                  # 6
        "bootstrap = [\n"                 # 7
        '  "1.2.3.4:8468",\n'             # 8
        '  "foo:99999",\n'                # 9
        '  "https://c.example.org/api/dht/bootstrap",\n'  # 10
        "]\n"                             # 11
        "[dhtt]\n"                        # 12
        "[worker]\n"                      # 13
        'services = ["OCR"]\n'            # 14
        "[log]\n"                         # 15
        'level = "loud"\n'                # 16
    )
    errors = _errors(tmp_path, text)
    prefixes = [e.split(": ", 2)[0] + ": " + e.split(": ", 2)[1] for e in errors]
    assert prefixes == [
        "PATH:3: agent.nmae",
        "PATH:5: dht.ksize",
        "PATH:6: dht.alpha",
        "PATH:9: dht.bootstrap",
        "PATH:12: dhtt",
        "PATH:14: worker.services",
        "PATH:16: log.level",
    ]


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.errors == [f"{p}:0: file: No such file or directory"]


def test_directory_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert ei.value.errors == [f"{tmp_path}:0: file: Is a directory"]
    if os.geteuid() != 0:                  # root reads anything
        p = tmp_path / "secret.toml"
        p.write_text(W)
        p.chmod(0)
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        assert ei.value.errors == [f"{p}:0: file: Permission denied"]


def test_not_utf8(tmp_path: Path) -> None:
    errors = _errors(tmp_path, b'[agent]\nname = "caf\xe9"\n' + W.encode())
    assert errors == ["PATH:0: file: not valid UTF-8 (byte 0xe9 at offset 19)"]


def test_the_shipped_configs_load() -> None:
    default = load_config(REPO / "config" / "agent.toml")
    assert default.agent.role == "worker"
    assert default.dht.bootstrap == ()          # no seeds shipped: loads, agent not ready
    assert default.tunnel.mode == "quick"
    assert default.worker.endpoint == ""
    assert default.agent.name == socket.gethostname()
    coord = load_config(REPO / "config" / "coordinator.toml")
    assert coord.agent.role == "coordinator" and coord.dht.mode == "server"
    worker = load_config(REPO / "config" / "worker.toml")
    assert worker.dht.bootstrap and worker.worker.endpoint.startswith("https://")
    assert worker.tunnel.mode == "off"
    # every shipped worker config names an upstream for each announced service, and no
    # shipped config puts the admin API anywhere but loopback
    for cfg in (default, worker):
        assert set(cfg.gateway.upstreams) == set(cfg.worker.services)
    assert worker.gateway.upstreams["llm-inference"].health == "/healthz"
    for cfg in (default, coord, worker):
        assert cfg.http.listen.host == "127.0.0.1"
    for cfg in (default, coord, worker):
        assert summary(cfg).startswith(f"ok: role={cfg.agent.role} ")


def test_default_agent_toml_documents_every_key() -> None:
    """The shipped file shows every key of the schema (commented or set)."""
    from agent.config import SCHEMA
    text = (REPO / "config" / "agent.toml").read_text()
    assert "dht.bootstrap" in text.split("[agent]")[0] and "worker.services" in text
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text or f"[{section}.{key}]" in text, (section, key)


@pytest.mark.parametrize("name", ["agent.toml", "coordinator.toml", "worker.toml"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    cfg = load_config(REPO / "config" / name)
    out = tmp_path / "dumped.toml"
    out.write_text(dump_toml(cfg))
    again = load_config(out)
    assert again == replace(cfg, source=out)


def test_round_trip_of_every_field(tmp_path: Path) -> None:
    text = (
        '[agent]\nname = "box \\"7\\""\nregion = "eu-west"\nstate_dir = "state"\n'
        '[dht]\nlisten = "[::]:9000"\nbootstrap = ["[2001:db8::1]:8468", "seed.example.org:8468",'
        ' "http://10.0.0.1:8080/api/dht/bootstrap"]\nmode = "client"\nksize = 8\nalpha = 2\n'
        "record_ttl = 120\nrepublish_interval = 10\n"
        '[http]\nlisten = "[::1]:8081"\ntrusted_proxies = ["127.0.0.1", "[::1]", "10.1.2.3/16"]\n'
        '[gateway]\nlisten = "[::]:8091"\nmax_body_mb = 2048\nupstream_timeout = 2.5\n'
        '[gateway.upstreams]\nocr = "http://127.0.0.1:9000/"\n'
        '"llm-inference" = { url = "https://gpu.local:9443/v1", health = "/v1/health" }\n'
        '[worker]\nservices = ["ocr", "llm-inference", "a.b_c"]\nendpoint = "http://[::1]:8081"\n'
        'max_concurrency = 9\ngpu = "RTX 4090"\ngpu_memory_gb = 24\n'
        'admission_cert = "certs/worker.cert"\n'
        f'[network]\nadmission_keys = ["{KEY}", "{KEY2}"]\n'
        '[tunnel]\nmetrics = "localhost:20242"\n'
        '[discovery]\ncache_ttl = 0\ncoordinators = ["https://c1.example.org", "http://127.0.0.1:8080"]\n'
        'max_results = 7\nmax_attempts = 5\nallow_http_hosts = ["LAN-Box", "10.0.0.1", "[fd00::1]"]\n'
        'allow_private_hosts = ["127.0.0.0/8", "Gpu.lan", "fd00::/8"]\n'
        '[discovery.gpu_scores]\n"RTX 4090" = 0.45\nB200 = 1\n'
        '[log]\nlevel = "DEBUG"\n'
    )
    src = tmp_path / "a.toml"
    src.write_text(text)
    cfg = load_config(src)
    assert cfg.agent.state_dir == tmp_path / "state"      # relative to the file
    assert cfg.dht.listen == Address("::", 9000)
    assert str(cfg.http.listen) == "[::1]:8081"
    assert cfg.worker.gpu_memory_gb == 24.0 and isinstance(cfg.worker.gpu_memory_gb, float)
    assert cfg.discovery.gpu_scores["B200"] == 1.0
    assert cfg.discovery.gpu_scores["A100"] == DEFAULT_GPU_SCORES["A100"]
    assert cfg.discovery.gpu_scores["RTX 4090"] == 0.45
    assert cfg.log.level == "debug"
    g = cfg.gateway
    assert (g.listen, g.max_body_mb, g.max_body_bytes, g.upstream_timeout) == (
        Address("::", 8091), 2048, 2048 << 20, 2.5)
    assert g.upstreams["ocr"] == Upstream("http://127.0.0.1:9000")
    assert g.upstreams["ocr"].health_url == "http://127.0.0.1:9000"
    assert g.upstreams["llm-inference"].health_url == "https://gpu.local:9443/v1/v1/health"
    assert cfg.worker.admission_cert == str(tmp_path / "certs" / "worker.cert")
    assert cfg.network.admission_public_keys == (bytes(range(32)), bytes(range(1, 33)))
    assert cfg.discovery.max_attempts == 5
    assert cfg.discovery.allow_http_hosts == ("lan-box", "10.0.0.1", "fd00::1")
    assert cfg.discovery.allow_private_hosts == ("127.0.0.0/8", "gpu.lan", "fd00::/8")
    assert cfg.http.trusted_proxies == ("127.0.0.1", "::1", "10.1.0.0/16")
    out = tmp_path / "sub" / "b.toml"
    out.parent.mkdir()
    out.write_text(dump_toml(cfg))
    assert load_config(out) == replace(cfg, source=out)


def test_defaults_match_spec(tmp_path: Path) -> None:
    p = tmp_path / "min.toml"
    p.write_text(W)
    cfg = load_config(p)
    assert cfg.agent.role == "worker"
    assert cfg.agent.name == socket.gethostname()
    assert cfg.agent.state_dir == Path("/var/lib/rma-agent")
    assert cfg.dht.listen == Address("0.0.0.0", 8468)
    assert (cfg.dht.mode, cfg.dht.ksize, cfg.dht.alpha) == ("auto", 20, 3)
    assert (cfg.dht.record_ttl, cfg.dht.republish_interval) == (300, 30)
    assert cfg.http.listen == Address("127.0.0.1", 8080)
    assert cfg.tunnel.mode == "off" and cfg.tunnel.metrics == Address("127.0.0.1", 20241)
    assert (cfg.discovery.cache_ttl, cfg.discovery.max_results) == (60, 50)
    assert cfg.discovery.gpu_scores == DEFAULT_GPU_SCORES
    assert cfg.worker.max_concurrency == 4 and cfg.worker.gpu is None
    assert cfg.log.level == "info"
    assert cfg.gateway.listen == Address("127.0.0.1", 8090)
    assert (cfg.gateway.max_body_mb, cfg.gateway.upstream_timeout) == (100, 300)
    assert cfg.gateway.upstreams == {} and cfg.worker.admission_cert == ""
    assert cfg.network.admission_keys == () and cfg.discovery.allow_http_hosts == ()
    assert cfg.discovery.allow_private_hosts == () and cfg.http.trusted_proxies == ()
    assert cfg.discovery.max_attempts == 3
    assert cfg.source == p
    # and they equal the dataclass defaults everybody else constructs
    assert replace(cfg, source=None, agent=replace(cfg.agent, name=Config().agent.name),
                   worker=replace(cfg.worker, services=())) == Config()


def test_coordinator_needs_no_worker_section(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[agent]\nrole = "coordinator"\n')
    assert load_config(p).agent.role == "coordinator"


@pytest.mark.parametrize(("text", "expected"), [
    ("[::1]:8468", Address("::1", 8468)),
    ("[2001:db8::7]:1", Address("2001:db8::7", 1)),
    ("[fe80::1%eth0]:8468", Address("fe80::1%eth0", 8468)),
    ("0.0.0.0:65535", Address("0.0.0.0", 65535)),
    ("seed-1.example.org:8468", Address("seed-1.example.org", 8468)),
    ("localhost:80", Address("localhost", 80)),
])
def test_addresses(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize("text", ["[::1]8468", "[::1]:", "::1", "[1.2.3.4]:80", "h:-1", ":80",
                                  "a..b:80", "-a.example:80", "1.2.3:80"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_ipv6_in_config(tmp_path: Path) -> None:
    p = tmp_path / "v6.toml"
    p.write_text(W + '[dht]\nlisten = "[::]:8468"\nbootstrap = ["[2001:db8::1]:8468", '
                 '"https://[2001:db8::2]:8443/api/dht/bootstrap"]\n')
    cfg = load_config(p)
    assert cfg.dht.listen == Address("::", 8468)
    assert len(cfg.dht.bootstrap) == 2


def test_line_of_inline_table_keys(tmp_path: Path) -> None:
    errors = _errors(tmp_path, "dht = { ksize = 3, alpha = 0 }\n" + W)
    assert errors[0].startswith("PATH:1: dht.alpha: must be an integer between 1 and 16, got 0")


def test_strings_with_brackets_do_not_confuse_the_locator(tmp_path: Path) -> None:
    text = (W                              # lines 1-2
            + "[dht]\n"                    # 3
            + 'mode = """\n'               # 4: a multi-line string that looks like TOML
            + "[tunnel]\n"                 # 5
            + "alpha = 1\n"                # 6
            + '"""\n'                      # 7
            + "alpha = 0\n")               # 8
    errors = _errors(tmp_path, text)
    assert [e.split(": ")[0] + ": " + e.split(": ")[1] for e in errors] == [
        "PATH:4: dht.mode", "PATH:8: dht.alpha"]


_SHIPPED = (REPO / "config" / "worker.toml").read_text()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_SHIPPED) - 1), st.integers(0, 40), st.text(max_size=6))
def test_mutated_configs_never_crash(pos: int, cut: int, insert: str) -> None:
    """Any edit of a real config gives a Config or a ConfigError with PATH:LINE lines."""
    text = _SHIPPED[:pos] + insert + _SHIPPED[pos + cut:]
    try:
        parse_config(text, "f.toml", base_dir=Path("/"))
    except ConfigError as e:
        assert e.errors
        for line in e.errors:
            assert re.match(r"f\.toml:\d+: [^:]+: ", line), line


_KEY = st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True),
                 st.text(st.sampled_from('ab [].#="\' '), min_size=1, max_size=6))
_TRICKY = st.text(st.sampled_from('ab[]#="\'\\{},\n'), max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_KEY, st.lists(st.tuples(_KEY, st.integers(0, 4), _TRICKY),
                                          min_size=1, max_size=5, unique_by=lambda t: t[0])),
                min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_locator_finds_the_line_of_every_key(sections: list[Any]) -> None:
    """Write random TOML (tricky strings, multi-line strings and arrays, inline tables,
    comments), then check the locator's line for every key and array entry."""
    from agent.config import _Locator, _toml_str
    lines: list[str] = []
    expected: dict[tuple[Any, ...], int] = {}

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)

    for sec, entries in sections:
        lines.append(f"[{key(sec)}]  # {sec!r}")
        expected[(sec,)] = len(lines)
        for name, shape, text in entries:
            path = (sec, name)
            expected[path] = len(lines) + 1
            if shape == 0:                                   # one-line string
                lines.append(f"{key(name)} = {_toml_str(text)} # [fake] x = 1")
            elif shape == 1:                                 # multi-line literal string
                body = text.replace("'", "")
                lines.append(f"{key(name)} = '''")
                lines.extend(body.split("\n"))
                lines[-1] += "'''"
            elif shape == 2:                                 # multi-line array
                lines.append(f"{key(name)} = [  # comment [x]")
                for i, part in enumerate([text, text[::-1], "x"]):
                    lines.append(f"  {_toml_str(part)},")
                    expected[(*path, i)] = len(lines)
                lines.append("]")
            elif shape == 3:                                 # inline table
                lines.append(f"{key(name)} = {{ a = {_toml_str(text)}, b = [1, 2] }}")
                expected[(*path, "a")] = expected[(*path, "b")] = len(lines)
            else:                                            # one-line array
                lines.append(f"{key(name)} = [{_toml_str(text)}, 3]")
                expected[(*path, 0)] = expected[(*path, 1)] = len(lines)
    text = "\n".join(lines) + "\n"
    import tomllib
    tomllib.loads(text)                                      # the generator writes valid TOML
    loc = _Locator(text)
    for path, line in expected.items():
        assert loc.lines.get(path) == line, (path, text)

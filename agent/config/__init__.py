"""Typed, frozen configuration of one agent, loaded from TOML (SPEC §4).

The package is cut along its seams: ``model`` (the dataclasses, defaults and limits),
``locator`` (line numbers of keys in the TOML text), ``validate`` (the error collector
and the host/address/URL checks), ``parser`` (``parse_config``/``load_config``) and
``dump`` (``dump_toml``/``summary``). Everything importers use is re-exported here, so
``from agent.config import Config, load_config`` keeps working. Validation reports *all*
errors at once, each as ``PATH:LINE: section.key: message`` (see ``ConfigError``).
"""

from __future__ import annotations

from agent.config.dump import dump_toml, summary, toml_dumps
from agent.config.locator import KeyPath, _Locator
from agent.config.model import (
    DEFAULT_GPU_SCORES,
    DEFAULT_PATH,
    DHT_MODES,
    ENV_PATH,
    LOG_LEVELS,
    ROLES,
    SCHEMA,
    SERVICE_RE,
    TUNNEL_MODES,
    Address,
    AgentSection,
    Config,
    ConfigError,
    DHTSection,
    DiscoverySection,
    GatewaySection,
    HTTPSection,
    LogSection,
    NetworkSection,
    TunnelSection,
    Upstream,
    WorkerSection,
    default_path,
)
from agent.config.parser import load_config, parse_config
from agent.config.validate import _toml_str, check_host, check_url, parse_address

__all__ = [
    "DEFAULT_GPU_SCORES", "DEFAULT_PATH", "DHT_MODES", "ENV_PATH", "LOG_LEVELS", "ROLES",
    "SCHEMA", "SERVICE_RE", "TUNNEL_MODES", "Address", "AgentSection", "Config",
    "ConfigError", "DHTSection", "DiscoverySection", "GatewaySection", "HTTPSection",
    "KeyPath", "LogSection", "NetworkSection", "TunnelSection", "Upstream", "WorkerSection", "_Locator", "_toml_str", "check_host", "check_url",
    "default_path", "dump_toml", "load_config", "parse_address", "parse_config", "summary",
    "toml_dumps",
]

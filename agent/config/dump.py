"""Config -> TOML (``dump_toml``, ``toml_dumps``) and the one-line ``summary``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from agent.config.model import DEFAULT_GPU_SCORES, SCHEMA, Address, Config, Upstream
from agent.config.validate import _render_key, _toml_str


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, Address | Path):
        return _toml_str(str(v))
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Upstream):
        table = {"url": v.url, "health": v.health,
                 "kind": v.kind if v.kind != "generic" else "", "metrics_url": v.metrics_url}
        table = {k: x for k, x in table.items() if x}
        return _toml_value(v.url) if len(table) == 1 else _toml_value(table)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_render_key((str(k),))} = {_toml_value(x)}"
                                for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__}")


def toml_dumps(sections: Mapping[str, Mapping[str, object]]) -> str:
    """``{"section": {"key": value}}`` as TOML (scalars, paths, addresses, lists and
    inline tables; ``None`` values are left out). Used by ``dump_toml``, ``rma-agent demo`` and the tests."""
    out: list[str] = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{_render_key((str(k),))} = {_toml_value(v)}"
                   for k, v in values.items() if v is not None)
        out.append("")
    return "\n".join(out)


def dump_toml(cfg: Config) -> str:
    """``cfg`` as TOML that ``load_config`` reads back to an equal ``Config``.

    Only GPU scores that differ from ``DEFAULT_GPU_SCORES`` are written (the loader
    merges them over the defaults again). A coordinator's config has no ``[worker]``.
    Upstreams go to ``[gateway.upstreams]``: a URL string, or an inline table when a
    health path, a kind other than generic or a metrics URL is set.
    """
    sections: dict[str, dict[str, object]] = {}
    for sec_name in SCHEMA:
        if sec_name == "worker" and cfg.agent.role != "worker":
            continue
        sec = getattr(cfg, sec_name)
        sections[sec_name] = {key: getattr(sec, key) for key in SCHEMA[sec_name]
                              if key not in ("gpu_scores", "upstreams")}
        if sec_name == "gateway" and cfg.gateway.upstreams:
            sections["gateway.upstreams"] = dict(cfg.gateway.upstreams)
    extra = {k: float(v) for k, v in cfg.discovery.gpu_scores.items()
             if DEFAULT_GPU_SCORES.get(k) != v}
    if extra:
        sections["discovery.gpu_scores"] = extra
    return toml_dumps(sections)


def summary(cfg: Config) -> str:
    """One line for ``check-config`` and the startup log."""
    role = cfg.agent.role
    extra = f" services={','.join(cfg.worker.services)}" if role == "worker" else ""
    tunnel = f" tunnel={cfg.tunnel.mode}" if cfg.tunnel.mode != "off" else ""
    kinds = ",".join(f"{s}:{u.kind}" for s, u in cfg.gateway.upstreams.items()
                     if u.kind != "generic")
    kinds = f" kinds={kinds}" if kinds else ""
    return (f"ok: role={role} name={cfg.agent.name} dht={cfg.dht.listen} mode={cfg.dht.mode} "
            f"http={cfg.http.listen} gateway={cfg.gateway.listen} seeds={len(cfg.dht.bootstrap)}"
            f"{extra}{kinds}{tunnel}")

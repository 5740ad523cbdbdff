"""Owns the event loop: uvloop, signals, startup, reload and shutdown.

SIGTERM/SIGINT: graceful stop (STOPPING=1, leave the network, close HTTP), exit 0
within 5 s. SIGHUP: re-read the config file; a bad file is rejected with every error
logged and the running config kept. A second SIGTERM/SIGINT while stopping exits at
once with status 1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from pathlib import Path

from agent.config import Config, ConfigError, load_config, summary
from agent.lifecycle import Agent
from agent.logs import setup_logging
from agent.ratelimit import RateLimiter
from agent.sdnotify_glue import Notifier, watchdog_interval, watchdog_task

log = logging.getLogger("rma_agent")
SHUTDOWN_BUDGET = 4.5  # seconds: systemd and the tests expect an exit within 5 s


def main(config_path: Path, cfg: Config) -> int:
    """Entry point of ``rma-agent run`` with the config the command line loaded from
    ``config_path`` (re-read from there on SIGHUP); returns the process exit code."""
    setup_logging(cfg.log.level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency of the package
        log.warning("uvloop not available; using the default asyncio loop")
        return asyncio.run(serve(cfg, config_path))
    return uvloop.run(serve(cfg, config_path))


def _install_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Exceptions in stray tasks are logged, rate-limited, never fatal."""
    limiter = RateLimiter(rate=0.2, burst=3)

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        key = type(exc).__name__ if exc else str(context.get("message"))
        limiter.log(log, logging.WARNING, key, "unhandled in event loop: %s %r",
                    context.get("message"), exc)

    loop.set_exception_handler(handler)


async def serve(cfg: Config, config_path: Path, notifier: Notifier | None = None) -> int:
    loop = asyncio.get_running_loop()
    _install_exception_handler(loop)
    notifier = notifier or Notifier()
    try:
        agent = Agent(cfg, notifier=notifier)
    except Exception:  # a broken install (a component that cannot be imported) or a bug
        log.exception("cannot start: building the agent failed")
        notifier.stopping("failed to start")
        return 1
    stop = asyncio.Event()
    stopping = False

    def on_stop(signame: str) -> None:
        nonlocal stopping
        if stopping:
            log.warning("second %s while stopping: exiting now", signame)
            os._exit(1)
        stopping = True
        log.info("%s received: shutting down", signame)
        stop.set()

    def on_hup() -> None:
        if not stopping:
            agent.spawn(reload(agent, config_path), "reload")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    log.info("starting rma-agent: %s", summary(cfg).removeprefix("ok: "))
    try:
        await agent.start()
    except OSError as exc:   # a taken port, an unwritable state dir: one clear line
        log.error("cannot start: %s", exc)
        notifier.stopping(f"failed to start: {exc}")
        return 1
    except Exception as exc:  # a bug: keep the traceback for the report
        log.exception("cannot start: %s", exc)
        notifier.stopping(f"failed to start: {exc}")
        return 1
    # Startup objects (modules, config, routes) live for the whole run: move them out of
    # the collector's view so its passes stay short (no multi-ms pauses on a busy node).
    gc.collect()
    gc.freeze()
    wd_task = None
    interval = watchdog_interval()
    if interval:
        wd_task = asyncio.ensure_future(watchdog_task(notifier, interval))
        log.debug("watchdog: pinging every %.2f s", interval)
    await stop.wait()
    if wd_task is not None:
        wd_task.cancel()
    try:
        await asyncio.wait_for(agent.stop(), SHUTDOWN_BUDGET)
    except TimeoutError:
        log.warning("shutdown took longer than %.1f s; exiting anyway", SHUTDOWN_BUDGET)
    notifier.close()
    return 0


async def reload(agent: Agent, config_path: Path) -> None:
    """SIGHUP: validate the file first; only a good config replaces the running one."""
    log.info("SIGHUP: reloading %s", config_path)
    try:
        new = await asyncio.get_running_loop().run_in_executor(None, load_config, config_path)
    except ConfigError as exc:
        agent.notifier.reloading()
        for line in exc.errors:
            log.error("reload rejected: %s", line)
        agent.core_metrics.reloads.labels("rejected").inc()
        agent.notifier.ready(agent.status_line())
        log.error("reload rejected (%d errors); keeping the running configuration",
                  len(exc.errors))
        return
    await agent.reload(new)

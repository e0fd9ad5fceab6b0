"""Running the app under uvicorn with a graceful shutdown: on SIGTERM or SIGINT (at any moment,
start-up included) stop accepting, let in-flight requests and streams finish until the drain
deadline, end whatever is left with a 503 (an error frame in a stream), leave jobs durable,
unload the models and exit 0."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from engine.core.access import AccessPolicy
from engine.core.settings import Settings
from engine.service import Engine

log = logging.getLogger("ember.serve")

# After the drain deadline the engine ends what is left; this long more lets the error frames
# and 503s go out before uvicorn cancels the connections' tasks.
FINAL_WRITE_S = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a signal starts the drain and is not raised again after
    shutdown (uvicorn re-raises it, so the process would end by signal, not with 0)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float):
        super().__init__(config)
        self.engine = engine
        self.drain_s = drain_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        if self._draining:
            return
        self._draining = True
        log.info("%s: draining for up to %.0fs, then shutting down",
                 signal.Signals(sig).name, self.drain_s,
                 extra={"request_id": "-"})  # not the request the signal interrupted
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # before the loop runs: nothing is in flight yet
            return
        loop.call_later(self.drain_s, self.engine.end_in_flight)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, policy: AccessPolicy) -> None:
    """A server reachable from the network needs an API key unless the operator says
    otherwise (allow_open_access)."""
    if is_loopback(settings.host) or policy.enabled or settings.allow_open_access:
        return
    raise SystemExit(
        f"ember: refusing to serve {settings.host} with no API key: anyone who can reach it "
        "could use the models. Set EMBER_API_KEY (or api_keys / api_keys_file), or "
        "EMBER_ALLOW_OPEN_ACCESS=true to serve it open on purpose.")


def serve(app: FastAPI, settings: Settings) -> None:
    check_exposure(settings, app.state.engine.access)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        log_config=None, access_log=False,  # ember.access writes one line per request
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s + FINAL_WRITE_S),
    )
    DrainingServer(config, app.state.engine, settings.drain_timeout_s).run()

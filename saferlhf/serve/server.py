"""Listening on a socket and stopping cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

import uvicorn
from fastapi import FastAPI

from saferlhf.errors import UserError

log = logging.getLogger(__name__)


class ListenError(UserError):
    """The address cannot be listened on (taken, or not this machine's)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``; a bind failure names the keys to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ListenError(
            f"serve.host={host} serve.port={port}: cannot listen there ({error.strerror})"
        ) from None
    return sock


class _Server(uvicorn.Server):
    """Uvicorn's server, except that a signal only stops it: uvicorn raises the signal again
    once shut down, which would end the process before the task writes its summary."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    log.info("serving on http://%s:%d (Ctrl-C or SIGTERM stops it)", host, port)
    _Server(config).run(sockets=[sock])

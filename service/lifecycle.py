"""How a SIGTERM reaches the apps of this process: the server (service/server.py) stops accepting connections and
calls `begin_drain`; each app then refuses new work with 503 and `Connection: close` while it answers what clients
had already sent; the server hands over to uvicorn's shutdown once every app has been quiet for a moment."""

from __future__ import annotations

from service.state import State

_apps: list[State] = []


def register(state: State) -> None:
    _apps.append(state)


def unregister(state: State) -> None:
    if state in _apps:
        _apps.remove(state)


def begin_drain() -> None:
    for state in _apps:
        state.begin_drain()


def quiet_since(seconds: float) -> bool:
    return all(state.quiet_since(seconds) for state in _apps)

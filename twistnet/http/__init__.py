"""
The twistnet-http service: an HTTP job endpoint. Submit a job for a declared tool, get its id
at once, poll its JSON result.

The package reads as the service's parts: L{model} (jobs, tools, parameters), L{tools}
(declaring tools), L{store} (durable jobs), L{runner} (running them as processes),
L{web} (the HTTP API) and L{tap} (twistd options and the service).
"""

from typing import Any

__all__ = ["Options", "makeService"]


def __getattr__(name: str) -> Any:
    # Imported on first use: a Python tool's child process imports twistnet.http modules and
    # should not pay for Twisted's web stack on every run.
    if name in __all__:
        from twistnet.http import tap

        return getattr(tap, name)
    raise AttributeError(name)

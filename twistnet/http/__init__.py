"""
The twistnet-http service: an HTTP job endpoint. Submit a job for a declared tool, get its id
at once, poll its JSON result.

The package reads as the service's parts: L{model} (jobs, tools, parameters), L{tools}
(declaring tools), L{store} (durable jobs), L{runner} (running them as processes),
L{web} (the HTTP API) and L{tap} (twistd options and the service).
"""

from twistnet.http.tap import Options, makeService

__all__ = ["Options", "makeService"]

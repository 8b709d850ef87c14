"""
Each route declared once, at its handler (as Klein's C{@route} does): the table it builds
drives both dispatch and the OpenAPI document, so neither can list a route the other lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from attrs import frozen

Handler = TypeVar("Handler", bound=Callable)

#: The attribute a decorated handler carries its routes in.
_MARK = "__twistnet_routes__"


@frozen
class Route:
    """C{method} on the path C{template} is served by the handler named C{handler}."""

    template: str
    method: str
    handler: str
    #: False for a route served but not described (an HTML page, say).
    in_openapi: bool = True

    @property
    def pattern(self) -> tuple[bytes | None, ...]:
        """The template's segments; None where a placeholder such as C{{id}} matches any."""
        return tuple(
            None if part.startswith("{") else part.encode()
            for part in self.template.lstrip("/").split("/")
        )


def route(template: str, method: str, *, in_openapi: bool = True) -> Callable[[Handler], Handler]:
    """Declare that the decorated method serves C{method} on C{template}."""

    def mark(handler: Handler) -> Handler:
        routes = getattr(handler, _MARK, ())
        setattr(handler, _MARK, (*routes, Route(template, method, handler.__name__, in_openapi)))
        return handler

    return mark


class RouteTable:
    """The routes of a class's C{@route} handlers, in the order they are declared."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        #: template -> method -> handler name
        self.methods: dict[str, dict[str, str]] = {}
        for declared in self.routes:
            self.methods.setdefault(declared.template, {})[declared.method] = declared.handler
        # By segment count: a path is compared only with the templates as long as it is.
        self._by_length: dict[int, dict[str, tuple[bytes | None, ...]]] = {}
        for declared in self.routes:
            pattern = declared.pattern
            self._by_length.setdefault(len(pattern), {})[declared.template] = pattern

    @classmethod
    def collect(cls, handlers: type) -> RouteTable:
        return cls(
            declared
            for attribute in vars(handlers).values()
            for declared in getattr(attribute, _MARK, ())
        )

    def match(self, segments: list[bytes]) -> tuple[str | None, list[str]]:
        """The template a request path's segments match and its placeholders' values."""
        for template, pattern in self._by_length.get(len(segments), {}).items():
            arguments = []
            for part, segment in zip(pattern, segments, strict=True):
                if part is None:
                    arguments.append(segment.decode("utf-8", "replace"))
                elif part != segment:
                    break
            else:
                return template, arguments
        return None, []

    def documented(self) -> list[Route]:
        return [declared for declared in self.routes if declared.in_openapi]

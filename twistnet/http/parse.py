"""
What a client sends, parsed without IO: a job submission into a L{Job}, and the query
arguments of a request. Each function returns the value or raises the L{ApiError} to answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twistnet.http.errors import ApiError
from twistnet.http.model import Job, ParamError, Tool

#: The largest number a query (cursor, offset) or Last-Event-ID may carry: SQLite's
#: integers and file offsets are signed 64-bit.
MAX_QUERY_INT = 2**63 - 1
#: A cursor is a row number: 18 digits are plenty, and the document's pattern says so.
MAX_CURSOR = 10**18 - 1

JSON = b"application/json"
_FIELDS = frozenset({"tool", "params", "timeout"})


def submission(
    body: bytes, content_type: bytes | None, tools: Mapping[str, Tool], now: float, job_id: str
) -> Job:
    """The job a POST /jobs body asks for, made at C{now} with id C{job_id}."""
    media_type = (content_type or b"").split(b";")[0].strip().lower()
    if media_type != JSON:
        raise ApiError(
            415, "unsupported media type", "Send the job as Content-Type: application/json."
        )
    document = _json(body)
    if not isinstance(document, dict):
        raise ApiError(400, "bad request", "The body must be a JSON object.")
    unknown = set(document) - _FIELDS
    if unknown:
        raise ApiError(
            400,
            "bad request",
            f"Unknown field {sorted(unknown)[0]!r}; expected tool, params, timeout.",
        )
    name = document.get("tool")
    if not isinstance(name, str):
        raise ApiError(400, "bad request", "Field 'tool' is required and must be a string.")
    tool = tools.get(name)
    if tool is None:
        raise ApiError(404, "unknown tool", f"No tool named {name!r}; GET /tools lists them.")
    try:
        params = tool.validate(document.get("params", {}))
    except ParamError as error:
        raise ApiError(400, "bad parameter", str(error)) from None
    timeout = _timeout(document.get("timeout"), tool)
    return Job(id=job_id, tool=tool.name, params=params, timeout=timeout, created=now)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON", "The body is not valid UTF-8.") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON", "The body is nested too deeply.") from None
    except ValueError as error:
        raise ApiError(400, "malformed JSON", f"The body is not valid JSON: {error}.") from None


def _timeout(value: Any, tool: Tool) -> float:
    if value is None:
        return tool.timeout
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ApiError(400, "bad request", "timeout must be a number of seconds more than 0.")
    if value > tool.timeout:
        raise ApiError(
            400, "bad request", f"timeout may be at most {tool.timeout:g} s for tool {tool.name!r}."
        )
    return float(value)


def query(args: Mapping[bytes, list[bytes]], name: bytes) -> str | None:
    """The last value of query argument C{name}, as text."""
    values = args.get(name)
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def int_query(
    args: Mapping[bytes, list[bytes]], name: bytes, default: int, low: int, high: int
) -> int:
    """Query argument C{name} as a whole number from C{low} to C{high}, else C{default}."""
    text = query(args, name)
    if text is None:
        return default
    number = whole_number(text, high)
    if number is None or number < low:
        raise ApiError(400, "bad request", f"{name.decode()} must be a whole number, {low}-{high}.")
    return number


def whole_number(text: str, high: int) -> int | None:
    """C{text} as a number of ASCII digits no larger than C{high}, or None."""
    # str.isdigit() also says yes to digits int() refuses ('\u00b2') and to numbers too large
    # for SQLite or a file offset: either was a 500.
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > high:
        return None
    return int(text)

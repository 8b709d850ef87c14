"""
The OpenAPI 3.1 document of the twistnet-http API, served at ``/openapi.json``.

Each operation is written by hand here; which of them the document lists comes from the
API's route table (L{twistnet.http.routing}), the one the resource dispatches on, so a
route cannot be served without being documented. The tools' parameter schemas are filled
in from the running catalogue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twistnet import __version__
from twistnet.http.model import STATUSES, Tool
from twistnet.http.routing import RouteTable

_REF = "#/components/schemas/"
_ERROR_PHRASES = {
    "400": "Bad request: malformed JSON, a missing, unknown or mistyped field or parameter.",
    "401": "A state-changing request without the right Bearer token.",
    "404": "No such job, tool or route.",
    "405": "The route exists, the method does not.",
    "409": "The job has already finished.",
    "413": "The request body is larger than --max-body.",
    "415": "The request body is not application/json.",
    "429": "The job queue is full; try again after Retry-After seconds.",
    "500": "An unexpected error; it is logged and the server keeps serving.",
    "503": "The job could not be stored (a full disk, say); try again after Retry-After.",
}


def _json(schema: str | dict[str, Any]) -> dict[str, Any]:
    body = {"$ref": _REF + schema} if isinstance(schema, str) else schema
    return {"application/json": {"schema": body}}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {"description": _ERROR_PHRASES[code], "content": _json("Error")}
        for code in ("405", "500", *codes)
    }


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


_JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "A job id, as returned by POST /jobs.",
    "schema": {"type": "string"},
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}


def _job_schema(with_output: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "id": {"type": "string"},
        "tool": {"type": "string"},
        "params": {"type": "object"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "exit_code": _nullable("integer", description="Negative: killed by that signal."),
        "truncated": {"type": "boolean", "description": "Output was cut to its head and tail."},
        "result": {"description": "The JSON value a Python tool returned, else null."},
        "error": _nullable("string", description="Why the job did not succeed."),
        "timeout": {"type": "number"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": _nullable("string", format="date-time"),
        "finished_at": _nullable("string", format="date-time"),
        "duration": _nullable("number", description="Seconds from start to finish."),
    }
    if with_output:
        properties["output"] = {"type": "string", "description": "stdout and stderr, bounded."}
    return {"type": "object", "required": list(properties), "properties": properties}


def operations(token_required: bool) -> dict[str, dict[str, Any]]:
    """The path items written here, by path template; each holds one operation per method."""
    secured = [{"bearer": []}] if token_required else []
    auth_errors = ("401",) if token_required else ()
    return {
        "/jobs": {
            "get": {
                "operationId": "listJobs",
                "summary": "Jobs, newest first, filtered and paginated.",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(STATUSES)},
                    },
                    {"name": "tool", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "next_cursor of the previous page.",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    },
                ],
                "responses": {
                    "200": {"description": "A page of jobs.", "content": _json("JobList")},
                    **_errors("400"),
                },
            },
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job; it is stored durably before the 202 is sent.",
                "security": secured,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "description": "A retry with the same key answers the job the first "
                        "request made instead of making a second one.",
                        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                    }
                ],
                "requestBody": {"required": True, "content": _json("JobRequest")},
                "responses": {
                    "202": {
                        "description": "Accepted and queued.",
                        "headers": {
                            "Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}
                        },
                        "content": _json("Accepted"),
                    },
                    **_errors("400", "404", "413", "415", *auth_errors),
                    **{
                        code: {
                            "description": _ERROR_PHRASES[code],
                            "headers": _RETRY_AFTER,
                            "content": _json("Error"),
                        }
                        for code in ("429", "503")
                    },
                    "503": {
                        "description": _ERROR_PHRASES["503"],
                        "headers": _RETRY_AFTER,
                        "content": _json("Error"),
                    },
                },
            },
        },
        "/jobs/{id}": {
            "parameters": [_JOB_ID],
            "get": {
                "operationId": "getJob",
                "summary": "A job, with its bounded output and result.",
                "responses": {
                    "200": {"description": "The job.", "content": _json("Job")},
                    **_errors("404"),
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel: a queued job never starts, a running one's process group "
                "gets SIGTERM, then SIGKILL after a grace period.",
                "security": secured,
                "responses": {
                    "200": {"description": "The cancelled job.", "content": _json("Job")},
                    **_errors("404", "409", *auth_errors),
                },
            },
        },
        "/jobs/{id}/log": {
            "parameters": [_JOB_ID],
            "get": {
                "operationId": "getJobLog",
                "summary": "The raw output from a byte offset; with Accept: text/event-stream, "
                "a live stream of it that resumes from Last-Event-ID.",
                "parameters": [
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "For the stream: the byte offset to resume from.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "Output bytes (X-Next-Offset says where to continue), "
                        "or a stream of events whose id is the byte offset after their data.",
                        "headers": {
                            "X-Next-Offset": {"schema": {"type": "integer"}},
                            "X-Job-Status": {"schema": {"type": "string"}},
                        },
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **_errors("400", "404"),
                },
            },
        },
        "/tools": {
            "get": {
                "operationId": "listTools",
                "summary": "The tools clients may run, with their parameter schemas.",
                "responses": {
                    "200": {"description": "The catalogue.", "content": _json("ToolList")},
                    **_errors(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})},
                    **_errors(),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness, queue depth and running jobs.",
                "responses": {
                    "200": {"description": "Serving.", "content": _json("Health")},
                    **_errors(),
                    "503": {
                        "description": "The job database (PostgreSQL) is out of reach.",
                        "content": _json("Health"),
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics: jobs by status, queue depth, durations, requests.",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
    }


def document(tools: Iterable[Tool], token_required: bool, routes: RouteTable) -> dict[str, Any]:
    """The OpenAPI document of the documented C{routes}, with the tools' parameter schemas."""
    tools = list(tools)
    written = operations(token_required)
    paths: dict[str, dict[str, Any]] = {}
    for declared in routes.documented():
        item = written[declared.template]
        path = paths.setdefault(
            declared.template, {key: value for key, value in item.items() if key == "parameters"}
        )
        path[declared.method.lower()] = item[declared.method.lower()]
    tool_schemas = {
        tool.name: tool.describe()["params"] | {"title": f"params of {tool.name}"} for tool in tools
    }
    components: dict[str, Any] = {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            },
            "JobRequest": {
                "type": "object",
                "required": ["tool"],
                "additionalProperties": False,
                "properties": {
                    "tool": {"type": "string", "description": "A name listed by GET /tools."},
                    "params": {
                        "type": "object",
                        "description": "The tool's parameters; see x-tool-params.",
                        "default": {},
                    },
                    "timeout": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "description": "Seconds; at most the tool's own timeout.",
                    },
                },
                "x-tool-params": tool_schemas,
            },
            "Accepted": {
                "type": "object",
                "required": ["id", "status", "url"],
                "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": list(STATUSES)},
                    "url": {"type": "string"},
                },
            },
            "Job": _job_schema(with_output=True),
            "JobSummary": _job_schema(with_output=False),
            "JobList": {
                "type": "object",
                "required": ["jobs", "next_cursor"],
                "properties": {
                    "jobs": {"type": "array", "items": {"$ref": _REF + "JobSummary"}},
                    "next_cursor": _nullable("string"),
                },
            },
            "ToolList": {
                "type": "object",
                "required": ["tools"],
                "properties": {"tools": {"type": "array", "items": {"type": "object"}}},
            },
            "Health": {
                "type": "object",
                "required": ["status", "queued", "running", "workers", "queue_size"],
                "properties": {
                    "status": {"type": "string"},
                    "queued": {"type": "integer"},
                    "running": {"type": "integer"},
                    "workers": {"type": "integer"},
                    "queue_size": {"type": "integer"},
                    "store": {
                        "description": "Only with a PostgreSQL store: did it answer within 1 s?",
                        "enum": ["reachable", "unreachable"],
                    },
                },
            },
        },
    }
    if token_required:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "twistnet-http",
            "version": __version__,
            "description": "Submit a job for a declared tool, get its id at once, poll its "
            'JSON result. Every error is {"error": ..., "detail": ...}.',
        },
        "paths": paths,
        "components": components,
    }

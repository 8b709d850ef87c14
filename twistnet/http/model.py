"""
The job model: what a job is, what a tool is, and how a client's parameters are checked.

A L{Tool} is declared by the operator; a client only names one and passes parameters, which
L{Tool.validate} checks against typed L{Param} specs before anything runs. A L{Job} is an
immutable record of one run; every change of state makes a new one with L{attrs.evolve}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
from attrs import field, frozen
from attrs.validators import deep_iterable, instance_of, optional

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
LOST = "lost"

#: Every status, in the order a job can pass through them.
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, LOST)
#: A job in one of these states never changes again.
TERMINAL = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, LOST})

#: A tool name is a plain word, never a path: clients choose among declared tools only.
TOOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A parameter name is usable as a placeholder and as a JSON key.
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: A string parameter longer than this is refused unless the tool says otherwise: an argv
#: element has a kernel limit of 128 KiB, and no honest parameter comes near it.
DEFAULT_MAX_LENGTH = 4096

PARAM_KINDS = ("string", "choice", "integer", "boolean")


class ParamError(ValueError):
    """A client's parameters do not fit the tool; C{param} names the culprit (or None)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(f"parameter {param!r}: {message}" if param else message)
        self.param = param


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern is not None else None


@frozen
class Param:
    """
    One typed parameter of a tool.

    @ivar kind: C{string} (optionally matching C{pattern}), C{choice} (one of C{choices}),
        C{integer} (within C{minimum}..C{maximum}) or C{boolean}.
    @ivar allow_dash: a string starting with C{-} (or a negative integer, unless C{minimum}
        is declared below 0) is refused unless this is set, so a value can never become an
        option of the command (argument injection).
    @ivar flag: for a boolean filling a whole argument: the argument when true (dropped when
        false); without it a boolean fills in C{true} or C{false}.
    """

    name: str
    kind: str = "string"
    required: bool = field(default=True, validator=instance_of(bool))
    default: Any = None
    description: str = field(default="", validator=instance_of(str))
    pattern: re.Pattern[str] | None = field(default=None, converter=_compile)
    choices: tuple[str, ...] = field(
        default=(), converter=tuple, validator=deep_iterable(instance_of(str))
    )
    minimum: int | None = field(default=None, validator=optional(instance_of(int)))
    maximum: int | None = field(default=None, validator=optional(instance_of(int)))
    max_length: int = field(default=DEFAULT_MAX_LENGTH, validator=instance_of(int))
    allow_dash: bool = field(default=False, validator=instance_of(bool))
    flag: str | None = field(default=None, validator=optional(instance_of(str)))

    def __attrs_post_init__(self) -> None:
        if not PARAM_NAME.fullmatch(self.name):
            raise ValueError(f"parameter name {self.name!r} is not a plain identifier")
        if self.kind not in PARAM_KINDS:
            kinds = ", ".join(PARAM_KINDS)
            raise ValueError(f"parameter {self.name!r}: type {self.kind!r} is not one of {kinds}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"parameter {self.name!r}: a choice needs a list of choices")
        if self.default is not None:
            try:
                self.check(self.default)
            except ParamError as error:
                raise ValueError(f"default of {error}") from None

    def check(self, value: Any) -> Any:
        """C{value} if it fits this parameter, else L{ParamError} saying why."""
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise ParamError(self.name, "must be true or false")
            return value
        if self.kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(self.name, "must be an integer")
            if value < 0 and self.minimum is None and not self.allow_dash:
                # "-5" is as much an option as "--version"; a declared minimum below 0 or
                # allow_dash says the operator means negatives.
                raise ParamError(self.name, "must not be negative (it could become an option)")
            if self.minimum is not None and value < self.minimum:
                raise ParamError(self.name, f"must be at least {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ParamError(self.name, f"must be at most {self.maximum}")
            return value
        if not isinstance(value, str):
            raise ParamError(self.name, "must be a string")
        if self.kind == "choice":
            if value not in self.choices:
                raise ParamError(self.name, f"must be one of {', '.join(self.choices)}")
            return value
        if len(value) > self.max_length:
            raise ParamError(self.name, f"must be at most {self.max_length} characters")
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                # A lone surrogate (JSON "\ud800") is no text that a file or an argv can hold.
                raise ParamError(self.name, "must be valid Unicode text") from None
        if "\x00" in value:
            # No argv element or environment value can carry a NUL byte.
            raise ParamError(self.name, "must not contain a NUL character")
        if value.startswith("-") and not self.allow_dash:
            raise ParamError(self.name, "must not start with '-' (it could become an option)")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ParamError(self.name, f"must match {self.pattern.pattern}")
        return value

    def argument(self, value: Any) -> str | None:
        """The argument text for C{value}; None drops a whole-argument boolean flag."""
        if self.kind == "boolean":
            if self.flag is not None:
                return self.flag if value else None
            return "true" if value else "false"
        return str(value)

    def schema(self) -> dict[str, Any]:
        """This parameter as JSON Schema, for /tools and the OpenAPI document."""
        schema: dict[str, Any]
        if self.kind == "boolean":
            schema = {"type": "boolean"}
        elif self.kind == "integer":
            schema = {"type": "integer"}
            if self.minimum is not None or not self.allow_dash:
                schema["minimum"] = self.minimum if self.minimum is not None else 0
            if self.maximum is not None:
                schema["maximum"] = self.maximum
        elif self.kind == "choice":
            schema = {"type": "string", "enum": list(self.choices)}
        else:
            schema = {"type": "string", "maxLength": self.max_length}
            if self.pattern is not None:
                schema["pattern"] = self.pattern.pattern
            if not self.allow_dash:
                schema["not"] = {"pattern": "^-"}
        if self.description:
            schema["description"] = self.description
        if self.default is not None:
            schema["default"] = self.default
        return schema


#: One argv element of a command template: literal text and parameter names, in order.
#: A part is C{(False, text)} for literal text and C{(True, name)} for a placeholder.
ArgTemplate = tuple[tuple[bool, str], ...]


@frozen
class Tool:
    """
    A command the operator declared, which clients may run with parameters.

    Exactly one of C{argv} (a command template, split once at start-up) and C{function}
    (C{module:function}, run in a child Python) is set.

    @ivar timeout: the longest a run may take, in seconds; clients may ask for less only.
    @ivar max_concurrent: at most this many runs of this tool at once (0: only --workers).
    @ivar retry_safe: a run interrupted by a restart may be run again from the start.
    """

    name: str
    argv: tuple[ArgTemplate, ...] = ()
    function: str | None = None
    params: tuple[Param, ...] = field(default=(), converter=tuple)
    timeout: float = field(default=60.0, validator=instance_of((int, float)))
    max_concurrent: int = field(default=0, validator=instance_of(int))
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = field(default=(), converter=lambda env: tuple(env))
    retry_safe: bool = field(default=False, validator=instance_of(bool))
    description: str = field(default="", validator=instance_of(str))

    def __attrs_post_init__(self) -> None:
        if not TOOL_NAME.fullmatch(self.name):
            raise ValueError(
                f"tool name {self.name!r} must be letters, digits, '.', '_' or '-' "
                "(a name, never a path)"
            )
        if bool(self.argv) == bool(self.function):
            raise ValueError(f"tool {self.name!r} needs exactly one of a command or a function")
        names = [param.name for param in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"tool {self.name!r} declares a parameter twice")
        if self.timeout <= 0:
            raise ValueError(f"tool {self.name!r}: timeout must be more than 0 seconds")
        if self.argv:
            used = {name for arg in self.argv for is_field, name in arg if is_field}
            if any(is_field for is_field, _ in self.argv[0]):
                raise ValueError(f"tool {self.name!r}: the program itself cannot be a parameter")
            if unknown := used - set(names):
                raise ValueError(
                    f"tool {self.name!r}: placeholder {{{sorted(unknown)[0]}}} is not a parameter"
                )
            if unused := set(names) - used:
                raise ValueError(
                    f"tool {self.name!r}: parameter {sorted(unused)[0]!r} is not in the command"
                )
            for arg in self.argv:
                for is_field, name in arg:
                    param = self.param(name) if is_field else None
                    if param and param.kind == "boolean" and param.flag and len(arg) != 1:
                        raise ValueError(
                            f"tool {self.name!r}: flag parameter {name!r} must be a whole argument"
                        )

    def param(self, name: str) -> Param | None:
        for param in self.params:
            if param.name == name:
                return param
        return None

    def validate(self, params: Any) -> dict[str, Any]:
        """The full parameters (defaults filled in), or L{ParamError} naming what is wrong."""
        if not isinstance(params, Mapping):
            raise ParamError(None, "params must be a JSON object")
        declared = {param.name: param for param in self.params}
        for name in params:
            if name not in declared:
                raise ParamError(name, f"unknown parameter of tool {self.name!r}")
        checked: dict[str, Any] = {}
        for name, param in declared.items():
            if name in params:
                checked[name] = param.check(params[name])
            elif param.default is not None:
                checked[name] = param.default
            elif param.required:
                raise ParamError(name, "is required")
        return checked

    def command(self, params: Mapping[str, Any]) -> list[str]:
        """
        The argv for validated C{params}: each placeholder fills argument text; nothing is
        ever split again or seen by a shell.
        """
        argv: list[str] = []
        for arg in self.argv:
            text = []
            dropped = False
            for is_field, part in arg:
                if not is_field:
                    text.append(part)
                    continue
                param = self.param(part)
                assert param is not None
                value = params.get(part)
                filled = "" if value is None else param.argument(value)
                if filled is None:
                    dropped = True
                else:
                    text.append(filled)
            if not dropped:
                argv.append("".join(text))
        return argv

    def describe(self) -> dict[str, Any]:
        """The catalogue entry of this tool, as served by /tools."""
        return {
            "name": self.name,
            "description": self.description,
            "kind": "python" if self.function else "command",
            "timeout": self.timeout,
            "max_concurrent": self.max_concurrent,
            "retry_safe": self.retry_safe,
            "params": {
                "type": "object",
                "additionalProperties": False,
                "required": [p.name for p in self.params if p.required and p.default is None],
                "properties": {param.name: param.schema() for param in self.params},
            },
        }


def iso(timestamp: float | None) -> str | None:
    """An epoch timestamp as ISO 8601 UTC with milliseconds, for JSON."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


@frozen
class Job:
    """
    One run of a tool, immutable: a change of state is a new L{Job} made with L{evolve}.

    @ivar timeout: the effective timeout in seconds (the client's, capped by the tool's).
    @ivar error: why the job did not succeed, in a sentence, or None.
    @ivar output_size: bytes of output kept (head and tail when C{truncated}).
    @ivar pid: while running, the pid leading the job's session and process group; kept so
        that a restart after a crash can kill what the job left behind. Not shown to clients.
    """

    id: str
    tool: str
    params: dict[str, Any]
    timeout: float
    created: float
    status: str = QUEUED
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    result: Any = None
    error: str | None = None
    truncated: bool = False
    output_size: int = 0
    pid: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        end = self.finished if self.finished is not None else None
        return None if end is None else round(end - self.started, 6)

    def evolve(self, **changes: Any) -> Job:
        return attrs.evolve(self, **changes)

    def to_json(self, output: str | None = None) -> dict[str, Any]:
        """The job as the API shows it; C{output} is the kept output, decoded."""
        return {
            "id": self.id,
            "tool": self.tool,
            "params": self.params,
            "status": self.status,
            "exit_code": self.exit_code,
            "output": output if output is not None else "",
            "truncated": self.truncated,
            "result": self.result,
            "error": self.error,
            "timeout": self.timeout,
            "created_at": iso(self.created),
            "started_at": iso(self.started),
            "finished_at": iso(self.finished),
            "duration": self.duration,
        }

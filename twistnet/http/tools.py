"""
Declaring tools: ``--tool 'NAME=COMMAND TEMPLATE'``, ``--config tools.toml``, and the
built-in tools used when neither is given.

A command template is split into argv with L{shlex.split} once, here, at start-up. Each
``{name}`` placeholder then fills argument text at run time: a value is never split again
and never seen by a shell, so ``; rm -rf /`` stays one literal argument.

The TOML form, one ``[tools.NAME]`` table per tool, is described with an annotated example
in the README, section "The tools file (``--config tools.toml``)".

A placeholder without a ``params`` entry is a required string.
"""

from __future__ import annotations

import os
import re
import shlex
import string
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from twistnet.http.model import PARAM_NAME, ArgTemplate, Param, Tool

#: The default timeout of a declared tool without one, in seconds.
DEFAULT_TIMEOUT = 60.0

_TOOL_KEYS = {
    "command",
    "argv",
    "function",
    "description",
    "timeout",
    "max_concurrent",
    "cwd",
    "env",
    "retry_safe",
    "params",
}
_PARAM_KEYS = {
    "type": "kind",
    "required": "required",
    "default": "default",
    "description": "description",
    "pattern": "pattern",
    "choices": "choices",
    "min": "minimum",
    "max": "maximum",
    "max_length": "max_length",
    "allow_dash": "allow_dash",
    "flag": "flag",
}


class ToolConfigError(ValueError):
    """A tool declaration the service cannot accept; the message says which and why."""


def parse_argument(text: str) -> ArgTemplate:
    """One argv element with its C{{name}} placeholders (C{{{}} and C{}}} are literal braces)."""
    parts: list[tuple[bool, str]] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise ToolConfigError(f"argument {text!r}: {error}") from None
    for literal, name, spec, conversion in parsed:
        if literal:
            parts.append((False, literal))
        if name is None:
            continue
        if spec or conversion or not PARAM_NAME.fullmatch(name):
            raise ToolConfigError(
                f"argument {text!r}: a placeholder is a plain {{name}}, got {{{name}}}"
            )
        parts.append((True, name))
    return tuple(parts)


def parse_argv(words: Iterable[str]) -> tuple[ArgTemplate, ...]:
    argv = tuple(parse_argument(word) for word in words)
    if not argv:
        raise ToolConfigError("the command is empty")
    return argv


def split_command(command: str) -> tuple[ArgTemplate, ...]:
    """Split a command template into argv, once, the way a POSIX shell would quote it."""
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise ToolConfigError(f"command {command!r}: {error}") from None
    return parse_argv(words)


def _placeholders(argv: tuple[ArgTemplate, ...]) -> list[str]:
    seen: list[str] = []
    for arg in argv:
        for is_field, name in arg:
            if is_field and name not in seen:
                seen.append(name)
    return seen


def _build(name: str, **fields: Any) -> Tool:
    try:
        return Tool(name=name, **fields)
    except (TypeError, ValueError) as error:
        raise ToolConfigError(str(error)) from None


def parse_tool_option(value: str) -> Tool:
    """A tool from C{--tool 'NAME=COMMAND TEMPLATE'}; every placeholder a required string."""
    name, sep, command = value.partition("=")
    name = name.strip()
    if not sep or not name or not command.strip():
        raise ToolConfigError(f"--tool {value!r}: expected NAME=COMMAND, e.g. 'greet=echo {{who}}'")
    argv = split_command(command)
    params = [Param(name=placeholder) for placeholder in _placeholders(argv)]
    return _build(name, argv=argv, params=params, timeout=DEFAULT_TIMEOUT)


def _param(tool: str, name: str, spec: Any) -> Param:
    if not isinstance(spec, Mapping):
        raise ToolConfigError(f"tool {tool!r}: params.{name} must be a table")
    unknown = set(spec) - set(_PARAM_KEYS)
    if unknown:
        raise ToolConfigError(
            f"tool {tool!r}: params.{name} has unknown key {sorted(unknown)[0]!r}"
        )
    fields = {_PARAM_KEYS[key]: value for key, value in spec.items()}
    try:
        return Param(name=name, **fields)
    except (TypeError, ValueError, re.error) as error:
        raise ToolConfigError(f"tool {tool!r}: {error}") from None


def tool_from_table(name: str, table: Any) -> Tool:
    """A tool from one C{[tools.NAME]} table of the configuration."""
    if not isinstance(table, Mapping):
        raise ToolConfigError(f"tools.{name} must be a table")
    unknown = set(table) - _TOOL_KEYS
    if unknown:
        raise ToolConfigError(f"tool {name!r}: unknown key {sorted(unknown)[0]!r}")
    forms = [key for key in ("command", "argv", "function") if key in table]
    if len(forms) != 1:
        raise ToolConfigError(f"tool {name!r} needs exactly one of command, argv or function")
    argv: tuple[ArgTemplate, ...] = ()
    function = None
    if "command" in table:
        argv = split_command(str(table["command"]))
    elif "argv" in table:
        if not isinstance(table["argv"], list) or not all(
            isinstance(word, str) for word in table["argv"]
        ):
            raise ToolConfigError(f"tool {name!r}: argv must be a list of strings")
        argv = parse_argv(table["argv"])
    else:
        function = str(table["function"])
        module, sep, attr = function.partition(":")
        if not sep or not module or not attr:
            raise ToolConfigError(f"tool {name!r}: function must be 'module:function'")
    params_table = table.get("params", {})
    if not isinstance(params_table, Mapping):
        raise ToolConfigError(f"tool {name!r}: params must be a table")
    params = [_param(name, key, spec) for key, spec in params_table.items()]
    declared = {param.name for param in params}
    params += [Param(name=p) for p in _placeholders(argv) if p not in declared]
    env = table.get("env", {})
    if not isinstance(env, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in env.items()
    ):
        raise ToolConfigError(f"tool {name!r}: env must be a table of strings")
    cwd = table.get("cwd")
    if cwd is not None and not (isinstance(cwd, str) and os.path.isdir(cwd)):
        raise ToolConfigError(f"tool {name!r}: cwd {cwd!r} is not a directory")
    return _build(
        name,
        argv=argv,
        function=function,
        params=params,
        timeout=table.get("timeout", DEFAULT_TIMEOUT),
        max_concurrent=table.get("max_concurrent", 0),
        cwd=cwd,
        env=tuple(sorted(env.items())),
        retry_safe=table.get("retry_safe", False),
        description=table.get("description", ""),
    )


def load_config(path: str | Path) -> list[Tool]:
    """The tools of a TOML configuration file."""
    try:
        with open(path, "rb") as config:
            document = tomllib.load(config)
    except OSError as error:
        raise ToolConfigError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ToolConfigError(f"{path} is not valid TOML: {error}") from None
    unknown = set(document) - {"tools"}
    if unknown:
        raise ToolConfigError(f"{path}: unknown section {sorted(unknown)[0]!r}")
    tables = document.get("tools", {})
    if not isinstance(tables, Mapping) or not tables:
        raise ToolConfigError(f"{path} declares no [tools.NAME] table")
    return [tool_from_table(name, table) for name, table in tables.items()]


def catalogue(tools: Iterable[Tool]) -> dict[str, Tool]:
    """Tools by name; a name declared twice is an error."""
    by_name: dict[str, Tool] = {}
    for tool in tools:
        if tool.name in by_name:
            raise ToolConfigError(f"tool {tool.name!r} is declared twice")
        by_name[tool.name] = tool
    return by_name


def word_count(text: str) -> dict[str, int]:
    """The built-in Python tool C{wordcount}: lines, words and characters of C{text}."""
    return {"lines": len(text.splitlines()), "words": len(text.split()), "chars": len(text)}


#: Used when no tool is declared, so a bare C{twistd -n twistnet-http} is useful at once.
#: Each only reads its parameters and prints: nothing touches files or the network.
BUILTIN_TOOLS: tuple[Tool, ...] = (
    Tool(
        name="echo",
        argv=split_command("echo {text}"),
        params=[Param(name="text", max_length=1000, description="The text to print.")],
        timeout=10,
        retry_safe=True,
        description="Print the text given.",
    ),
    Tool(
        name="sleep",
        argv=split_command("sleep {seconds}"),
        params=[
            Param(
                name="seconds",
                kind="integer",
                minimum=0,
                maximum=300,
                default=1,
                description="How long to sleep.",
            )
        ],
        timeout=310,
        retry_safe=True,
        description="Sleep a while, then exit 0 (to try queueing, timeouts and cancel).",
    ),
    Tool(
        name="date",
        argv=split_command("date -u +%Y-%m-%dT%H:%M:%SZ"),
        timeout=10,
        retry_safe=True,
        description="Print the current UTC time.",
    ),
    Tool(
        name="wordcount",
        function="twistnet.http.tools:word_count",
        params=[Param(name="text", max_length=100_000, allow_dash=True)],
        timeout=30,
        retry_safe=True,
        description="Count lines, words and characters; a Python tool with a JSON result.",
    ),
)

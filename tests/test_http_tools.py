"""twistnet-http tools and parameters: declaring tools and checking what clients send."""

from __future__ import annotations

import pytest

from twistnet.http.model import Job, Param, ParamError, Tool
from twistnet.http.tools import (
    BUILTIN_TOOLS,
    ToolConfigError,
    catalogue,
    load_config,
    parse_tool_option,
    split_command,
)


def test_tool_option_is_split_once_and_placeholders_fill_whole_text():
    tool = parse_tool_option("greet=echo 'hello there' {who} --name={who}!")
    assert tool.name == "greet"
    assert [p.name for p in tool.params] == ["who"]
    argv = tool.command(tool.validate({"who": "a b; rm -rf / $(id) `id` 'q'"}))
    assert argv == [
        "echo",
        "hello there",
        "a b; rm -rf / $(id) `id` 'q'",
        "--name=a b; rm -rf / $(id) `id` 'q'!",
    ]


def test_literal_braces_are_kept():
    tool = parse_tool_option("j=printf {{}}{x}")
    assert tool.command({"x": "1"}) == ["printf", "{}1"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("noequals", "expected NAME=COMMAND"),
        ("=echo x", "expected NAME=COMMAND"),
        ("x=", "expected NAME=COMMAND"),
        ("../bin/sh=echo", "never a path"),
        ("x={prog} arg", "program itself cannot be a parameter"),
        ("x=echo {a.b}", "plain {name}"),
        ("x=echo {a!r}", "plain {name}"),
        ("x=echo 'unclosed", "No closing quotation"),
        ("x=echo {", "Single '{'"),
    ],
)
def test_bad_tool_options_say_why(option, message):
    with pytest.raises(ToolConfigError, match=message.replace("{", r"\{").replace(".", r"\.")):
        parse_tool_option(option)


def test_validation_names_the_parameter():
    tool = Tool(
        name="t",
        argv=split_command("t {s} {n} {c} {b}"),
        params=[
            Param(name="s", pattern="[a-z]+"),
            Param(name="n", kind="integer", minimum=1, maximum=5, default=2),
            Param(name="c", kind="choice", choices=["x", "y"], required=False),
            Param(name="b", kind="boolean", flag="--verbose", default=False),
        ],
    )
    assert tool.validate({"s": "abc"}) == {"s": "abc", "n": 2, "b": False}
    assert tool.command(tool.validate({"s": "abc"})) == ["t", "abc", "2", ""]
    assert tool.command(tool.validate({"s": "abc", "b": True, "c": "y"})) == [
        "t",
        "abc",
        "2",
        "y",
        "--verbose",
    ]
    cases = {
        "s": [{"s": "ABC"}, {"s": 3}, {"s": "-x"}, {"s": "a\x00b"}],
        "n": [
            {"s": "a", "n": 0},
            {"s": "a", "n": 6},
            {"s": "a", "n": "3"},
            {"s": "a", "n": 1.5},
            {"s": "a", "n": True},
        ],
        "c": [{"s": "a", "c": "z"}],
        "b": [{"s": "a", "b": "yes"}, {"s": "a", "b": 1}],
        "zz": [{"s": "a", "zz": 1}],
    }
    for name, bad in cases.items():
        for params in bad:
            with pytest.raises(ParamError) as caught:
                tool.validate(params)
            assert caught.value.param == name, params
            assert repr(name) in str(caught.value)
    with pytest.raises(ParamError, match="'s': is required"):
        tool.validate({})
    with pytest.raises(ParamError, match="must be a JSON object"):
        tool.validate(["s"])


def test_an_option_as_a_value_is_refused_unless_allowed():
    tool = parse_tool_option("g=grep {pattern} file")
    with pytest.raises(ParamError, match="must not start with '-'"):
        tool.validate({"pattern": "--version"})
    allowed = Tool(name="g", argv=tool.argv, params=[Param(name="pattern", allow_dash=True)])
    assert allowed.command(allowed.validate({"pattern": "--version"})) == [
        "grep",
        "--version",
        "file",
    ]


def test_config_file_full_form(tmp_path):
    config = tmp_path / "tools.toml"
    config.write_text(
        """
[tools.greet]
command = "echo hello {who} {loud}"
description = "Say hello."
timeout = 5
max_concurrent = 2
cwd = "/tmp"
env = { GREETING = "hi" }
retry_safe = true

[tools.greet.params.who]
type = "string"
pattern = "[a-z]+"

[tools.greet.params.loud]
type = "boolean"
flag = "-e"
default = false

[tools.py]
function = "twistnet.http.tools:word_count"

[tools.py.params.text]
allow_dash = true

[tools.list]
argv = ["ls", "-l", "{path}"]
"""
    )
    tools = catalogue(load_config(config))
    greet = tools["greet"]
    assert greet.timeout == 5
    assert greet.max_concurrent == 2
    assert greet.cwd == "/tmp"
    assert dict(greet.env) == {"GREETING": "hi"}
    assert greet.retry_safe
    assert greet.command(greet.validate({"who": "bob", "loud": True})) == [
        "echo",
        "hello",
        "bob",
        "-e",
    ]
    assert tools["py"].function == "twistnet.http.tools:word_count"
    assert tools["list"].command({"path": "a b"}) == ["ls", "-l", "a b"]
    schema = greet.describe()["params"]
    assert schema["required"] == ["who"]
    assert schema["properties"]["who"]["pattern"] == "[a-z]+"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tools.x]\ncommand='a'\nshell=true\n", "unknown key 'shell'"),
        ("[tools.x]\ncommand='a'\nfunction='m:f'\n", "exactly one of"),
        ("[tools.x]\nfunction='nocolon'\n", "module:function"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\ntype='float'\n", "not one of"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\nkind='x'\n", "unknown key 'kind'"),
        ("[tools.x]\ncommand='a'\n[tools.x.params.q]\n", "'q' is not in the command"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\ntype='choice'\n", "list of choices"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\ndefault='-x'\n", "default of"),
        ("[tools.x]\ncommand='a'\ntimeout=0\n", "more than 0"),
        ("[other]\n", "unknown section"),
        ("", "declares no"),
        ("[tools.x\n", "not valid TOML"),
        ("[tools.x]\ncommand='a'\ntimeout='soon'\n", "'timeout' must be"),
        ("[tools.x]\ncommand='a'\nmax_concurrent=1.5\n", "'max_concurrent' must be"),
        ("[tools.x]\ncommand='a'\ncwd='/nonexistent'\n", "is not a directory"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\npattern='['\n", "unterminated"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\ntype='integer'\nmin='1'\n", "'minimum'"),
        ("[tools.x]\ncommand='a {p}'\n[tools.x.params.p]\nrequired='no'\n", "'required'"),
    ],
)
def test_bad_config_files_say_why(tmp_path, text, message):
    config = tmp_path / "tools.toml"
    config.write_text(text)
    with pytest.raises(ToolConfigError, match=message):
        load_config(config)


def test_missing_config_file_and_duplicates():
    with pytest.raises(ToolConfigError, match="cannot read"):
        load_config("/nonexistent/tools.toml")
    with pytest.raises(ToolConfigError, match="declared twice"):
        catalogue([parse_tool_option("a=echo"), parse_tool_option("a=true")])


def test_builtin_tools_are_valid_and_harmless():
    tools = catalogue(BUILTIN_TOOLS)
    assert set(tools) == {"echo", "sleep", "date", "wordcount"}
    assert tools["echo"].command({"text": "; id"}) == ["echo", "; id"]
    assert tools["sleep"].validate({}) == {"seconds": 1}
    with pytest.raises(ParamError):
        tools["sleep"].validate({"seconds": 301})


def test_job_json_has_every_field():
    job = Job(id="j1", tool="echo", params={"text": "x"}, timeout=5, created=0.0)
    done = job.evolve(status="succeeded", started=1.0, finished=3.5, exit_code=0)
    document = done.to_json("out")
    assert document["duration"] == 2.5
    assert document["created_at"] == "1970-01-01T00:00:00.000+00:00"
    assert document["output"] == "out"
    assert done.terminal and not job.terminal

"""twistnet-http options refused at start: tools whose program is missing, an empty token file."""

from __future__ import annotations

import pytest
from twisted.python import usage

from twistnet.http import Options
from twistnet.http.runner import DEFAULT_PATH


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def refusal(*argv) -> str:
    with pytest.raises(usage.UsageError) as caught:
        parse(*argv)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch):
    monkeypatch.delenv("TWISTNET_HTTP_TOKEN", raising=False)


def executable(directory, name):
    program = directory / name
    program.write_text("#!/bin/sh\necho hi\n")
    program.chmod(0o755)
    return program


def test_a_tool_option_whose_program_is_missing_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("PATH", DEFAULT_PATH)
    message = refusal("--tool", "x=nosuchprogram {a}")
    assert message == f"tool 'x': program 'nosuchprogram' is not found on PATH {DEFAULT_PATH}"


def test_a_config_tool_whose_program_is_missing_is_refused_at_start(tmp_path):
    config = tmp_path / "tools.toml"
    config.write_text('[tools.ok]\ncommand = "echo {a}"\n[tools.bad]\nargv = ["nosuch", "{a}"]\n')
    assert refusal("--config", str(config)).startswith(
        "tool 'bad': program 'nosuch' is not found on PATH "
    )


def test_programs_are_found_on_the_path_the_runner_gives_the_tool(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir, "mytool")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert set(parse("--tool", "m=mytool {a}")["tools"]) == {"m"}
    monkeypatch.delenv("PATH")  # the runner then gives its tools DEFAULT_PATH
    assert "not found on PATH /usr/local/bin" in refusal("--tool", "m=mytool {a}")
    config = tmp_path / "tools.toml"
    config.write_text(f'[tools.m]\ncommand = "mytool"\nenv = {{ PATH = "{bin_dir}" }}\n')
    assert set(parse("--config", str(config))["tools"]) == {"m"}


def test_a_program_with_a_slash_is_looked_up_from_the_tools_cwd(tmp_path):
    executable(tmp_path, "run.sh")
    (tmp_path / "plain.txt").write_text("not a program")
    config = tmp_path / "tools.toml"
    config.write_text(f'[tools.r]\ncommand = "./run.sh"\ncwd = "{tmp_path}"\n')
    assert set(parse("--config", str(config))["tools"]) == {"r"}
    config.write_text(f'[tools.r]\ncommand = "./plain.txt"\ncwd = "{tmp_path}"\n')
    assert refusal("--config", str(config)) == (
        "tool 'r': program './plain.txt' is not an executable file"
    )


def test_the_builtin_tools_pass_the_check(monkeypatch):
    monkeypatch.delenv("PATH")
    assert set(parse()["tools"]) == {"echo", "sleep", "date", "wordcount"}


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_an_empty_token_file_says_it_is_empty(tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    assert refusal("--token-file", str(token_file)) == f"--token-file {token_file} is empty."

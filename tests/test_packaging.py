"""Packaging traps: the wheel must carry our plugin and nothing that shadows Twisted's own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import TWISTD

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("twistnet-echo", "twistnet-log", "twistnet-chat", "twistnet-http")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    uv = shutil.which("uv")
    command = [uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)] if uv else None
    if command is None:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("twistnet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_ships_the_plugin_file_and_the_package(wheel_names):
    assert "twisted/plugins/twistnet_plugins.py" in wheel_names
    assert "twistnet/__init__.py" in wheel_names
    assert "twistnet/echo.py" in wheel_names


def test_wheel_never_shadows_or_clobbers_twisted(wheel_names):
    forbidden = {"twisted/__init__.py", "twisted/plugins/__init__.py"}
    assert not forbidden & set(wheel_names)
    assert not [name for name in wheel_names if name.endswith("dropin.cache")]
    assert {name.split("/")[0] for name in wheel_names} <= {"twisted", "twistnet"} | {
        name.split("/")[0] for name in wheel_names if ".dist-info/" in name
    }


def test_twistd_lists_every_service_from_any_directory(tmp_path):
    result = subprocess.run(
        [TWISTD, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0
    for name in SERVICES:
        line = next((line for line in result.stdout.splitlines() if name in line), "")
        assert line.split(name, 1)[1].strip(), f"{name} missing or without description"

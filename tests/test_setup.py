"""The README's two commands on any Python: make uses an active environment, or makes .venv in the clone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


def make_dry_run(target: str, environment: dict, venv: Path, python: str = "python3") -> str:
    """What `make TARGET` would run, without running it."""
    result = subprocess.run(
        ["make", "-n", target, f"PYTHON={python}", f"VENV={venv}"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def outside_any_environment() -> dict:
    return {name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "CONDA_PREFIX")}


def test_outside_an_environment_make_creates_and_uses_its_own_venv(tmp_path):
    venv = tmp_path / "venv"
    commands = make_dry_run("test", outside_any_environment(), venv, python="/usr/bin/python3")
    assert f'scripts/make_venv.sh "/usr/bin/python3" "{venv}"' in commands
    assert f"PYTHON={venv}/bin/python bash scripts/install.sh requirements-dev.txt" in commands
    assert f"{venv}/bin/python -m pytest tests" in commands


def test_an_existing_venv_is_reused_not_made_again(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    commands = make_dry_run("demo", outside_any_environment(), venv)
    assert "make_venv.sh" not in commands
    assert f"PYTHON={venv}/bin/python bash scripts/demo.sh" in commands


@pytest.mark.parametrize("variable", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_inside_an_active_environment_make_uses_it(tmp_path, variable):
    environment = {**outside_any_environment(), variable: str(tmp_path / "active")}
    commands = make_dry_run("test", environment, tmp_path / "venv", python="/opt/env/bin/python")
    assert "make_venv.sh" not in commands
    assert "/opt/env/bin/python -m pytest tests" in commands
    assert "venv/bin/python" not in commands


def test_make_clean_removes_the_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    subprocess.run(["make", "clean", f"VENV={venv}"], cwd=REPO_ROOT, check=True, capture_output=True)
    assert not venv.exists()


def python_without_ensurepip(tmp_path: Path) -> Path:
    """A Python as Debian ships it without python3-venv: `import ensurepip` fails."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ImportError('ensurepip is in python3-venv')\n")
    wrapper = tmp_path / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_a_python_without_the_venv_module_gets_a_message_naming_the_package(tmp_path):
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["bash", "scripts/make_venv.sh", str(python_without_ensurepip(tmp_path)), str(venv)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "apt install python3-venv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not venv.exists()


def test_an_interpreter_that_does_not_exist_is_named(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/make_venv.sh", "python3.99", str(tmp_path / "venv")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "PYTHON=python3.99 is not an interpreter" in result.stderr


def recording_python(tmp_path: Path, uv: str) -> Path:
    """A stand-in interpreter for scripts/install.sh: it writes each call's arguments to calls.log and has torch.
    ``uv``: "present" (``-m uv`` runs), "installable" (pip can install it) or "missing" (pip cannot)."""
    wrapper = tmp_path / "python"
    has_uv = f'test -e "{tmp_path}/uv"' if uv != "missing" else "false"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{tmp_path}/calls.log"\n'
        'case "$*" in\n'
        '  "-c import torch; "*) echo 2.13.0 ;;\n'
        f'  "-m uv --version") {has_uv} ;;\n'
        f'  "-m pip install --no-compile --quiet --retries 0 uv") {has_uv.replace("test -e", "touch")} ;;\n'
        "esac\n"
    )
    wrapper.chmod(0o755)
    if uv == "present":
        (tmp_path / "uv").touch()
    return wrapper


def install_calls(tmp_path: Path, uv: str, **env) -> tuple[list[str], str]:
    """The stand-in interpreter's calls from scripts/install.sh, and what the script printed."""
    tmp_path.mkdir(exist_ok=True)
    python = recording_python(tmp_path, uv)
    result = subprocess.run(
        ["bash", "scripts/install.sh", "requirements-dev.txt"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHON": str(python), **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return (tmp_path / "calls.log").read_text().splitlines(), result.stdout


@pytest.mark.parametrize("uv", ["present", "installable"])
def test_install_takes_uv_into_the_same_environment_where_it_can_be_had(tmp_path, uv):
    calls, _ = install_calls(tmp_path, uv)
    python = tmp_path / "python"
    assert f"-m uv pip install --python {python} -r requirements-dev.txt" in calls
    assert f"-m uv pip install --python {python} --no-deps -e ." in calls
    assert ("-m pip install --no-compile --quiet --retries 0 uv" in calls) == (uv == "installable")
    assert not [call for call in calls if "-r requirements-dev.txt" in call and "-m pip install" in call]
    # Nothing compiles site-packages at install time: imports compile what they use.
    assert not [call for call in calls if "compileall" in call]


def test_install_falls_back_to_pip_without_uv_and_when_told_to(tmp_path):
    calls, said = install_calls(tmp_path / "missing", "missing")
    assert "-m pip install --no-compile -r requirements-dev.txt" in calls
    assert "-m pip install --no-compile --no-deps -e ." in calls
    assert "uv was not available or failed: installing with pip" in said
    calls, said = install_calls(tmp_path / "told", "present", INSTALLER="pip")
    assert "-m pip install --no-compile -r requirements-dev.txt" in calls
    assert not [call for call in calls if "uv" in call.split()]
    assert "uv was not" not in said

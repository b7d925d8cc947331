"""Chip compilers in virtual environments of their own, under the user's cache.

A chip's compiler often pins libraries the project cannot share (Sony's IMX500 converter pins onnx,
onnxruntime and protobuf), so each lives in its own virtual environment, built once by
``eptq-deploy toolchain install NAME`` and called as a program. A target declares the toolchain it
needs (``Target.toolchain``); this module knows none by name. Nothing is downloaded at run time:
a missing toolchain is refused before any work, with the command that installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetError, UsageError

#: overrides where toolchains live (default: $XDG_CACHE_HOME or ~/.cache, then eptq-deploy/toolchains)
CACHE_ENV = "EPTQ_DEPLOY_TOOLCHAINS"
_MARKER = "eptq-deploy-toolchain.json"


@dataclass(frozen=True)
class Toolchain:
    """A compiler installed from PyPI: pinned ``packages``, the ``executable`` it provides, and the
    system programs it needs beside Python (``system``: program -> how to get it)."""

    name: str
    description: str
    packages: tuple[str, ...]
    executable: str
    system: dict[str, str] = field(default_factory=dict)


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eptq-deploy" / "toolchains"


def location(tc: Toolchain) -> Path:
    return cache_root() / tc.name


def _bin(env: Path, program: str) -> Path:
    return env / ("Scripts" if sys.platform == "win32" else "bin") / program


def installed(tc: Toolchain) -> Path | None:
    """The toolchain's executable where it is installed with exactly its pinned packages, else None."""
    env = location(tc)
    try:
        marker = json.loads((env / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    exe = _bin(env, tc.executable)
    return exe if marker.get("packages") == list(tc.packages) and exe.exists() else None


def missing_system(tc: Toolchain) -> list[str]:
    """One line per system program the toolchain needs and this machine lacks."""
    return [f"{prog} not found on PATH ({how})" for prog, how in tc.system.items() if shutil.which(prog) is None]


def require(tc: Toolchain, target: str) -> Path:
    """The executable, or a one-line refusal naming the command that installs it."""
    exe = installed(tc)
    if exe is None:
        raise TargetError(f"target {target} needs the {tc.name} toolchain ({tc.description}), not installed in "
                          f"{location(tc)}; install it once with: eptq-deploy toolchain install {tc.name}")
    lacking = missing_system(tc)
    if lacking:
        raise TargetError(f"target {target}: {'; '.join(lacking)}")
    return exe


def install(tc: Toolchain, quiet: bool = False, force: bool = False) -> Path:
    """Build the toolchain's virtual environment with its pinned packages (from the package index pip
    is configured for); returns the executable. Kept where installed with the same pins, unless ``force``."""
    lacking = missing_system(tc)
    if lacking:
        raise UsageError(f"toolchain {tc.name}: {'; '.join(lacking)}")
    if not force and installed(tc) is not None:
        return installed(tc)
    env = location(tc)
    if env.exists():
        shutil.rmtree(env)
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    py = _bin(env, "python")
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *(["-q"] if quiet else []), *tc.packages]
    done = subprocess.run(cmd, capture_output=quiet, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] if quiet else []
        shutil.rmtree(env, ignore_errors=True)
        raise UsageError(f"toolchain {tc.name}: pip install {' '.join(tc.packages)} failed"
                         + (f": {tail[0]}" if tail else "") + "; check the package index pip uses")
    exe = _bin(env, tc.executable)
    if not exe.exists():
        shutil.rmtree(env, ignore_errors=True)
        raise UsageError(f"toolchain {tc.name}: the packages installed no {tc.executable}")
    (env / _MARKER).write_text(json.dumps({"name": tc.name, "packages": list(tc.packages)}, indent=1) + "\n")
    return exe


def run(tc: Toolchain, target: str, args: list[str], cwd: Path, timeout: float = 1800,
        program: str | None = None) -> subprocess.CompletedProcess:
    """Run the toolchain's executable (or another ``program`` of its environment, e.g. its ``python``);
    its own output is returned, never raised as a traceback."""
    exe = require(tc, target)
    if program is not None:
        exe = _bin(location(tc), program)
    try:
        return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TargetError(f"target {target}: {exe.name} ran past {timeout:.0f} s and was stopped") from None

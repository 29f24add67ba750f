"""Helpers of tests/test_container.py: podman with a storage of its own, a Debian base image made with
debootstrap, and this machine's pip configuration passed into a build. Plain functions; the fixtures are in
the test file.

Nothing here is written into an image: pip's settings are mounted into the build's RUN steps
(`podman build --volume`) and the Containerfile's last stage runs nothing, so no mount point stays behind.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

DEBIAN_SUITE = "bookworm"  # Python 3.11, as the local PyTorch wheel (cp311) and the project's tests
DEBIAN_MIRROR = os.environ.get("VIRNUCPRO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TOOLS = {"podman": "podman", "debootstrap": "debootstrap"}  # command -> Debian package


def ensure_tools() -> None:
    """podman and debootstrap are on PATH: installed with apt-get (after an update) when missing and this is
    root on a Debian-like machine, as in CI; otherwise the test is skipped, naming what to install."""
    missing = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"needs {', '.join(missing)} (as root: apt-get install {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


class Podman:
    """podman as root with its own image storage under `folder` (removed with `close`): nothing of the
    machine's own podman storage is read or changed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.runroot = Path(tempfile.mkdtemp(prefix="vnp-podman-"))  # podman wants at most 50 characters here
        self.options = ["--root", str(folder / "storage"), "--runroot", str(self.runroot)]

    def __call__(self, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """Run `podman ARGS`; fails with its output unless it succeeds."""
        result = subprocess.run(["podman", *self.options, *args], capture_output=True, text=True, timeout=timeout,
                                check=False, **kwargs)  # fmt: skip
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout[-6000:]}{result.stderr[-6000:]}"
        return result

    def close(self) -> None:
        subprocess.run(["podman", *self.options, "image", "unmount", "--all", "--force"], capture_output=True,
                       timeout=120, check=False)  # fmt: skip
        subprocess.run(["podman", *self.options, "system", "reset", "--force"], capture_output=True, timeout=300,
                       check=False)  # fmt: skip
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


def debian_base(podman: Podman, folder: Path, tag: str) -> str:
    """A minimal Debian image with python3 and its venv module, made with debootstrap from Debian's archive
    and imported into `podman`, without apt's package lists and downloaded packages; its name."""
    rootfs = folder / "rootfs"
    command = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", DEBIAN_SUITE, str(rootfs),
               DEBIAN_MIRROR]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    for leftover in [*rootfs.glob("var/cache/apt/*.bin"), *rootfs.glob("var/cache/apt/archives/*.deb"),
                     *rootfs.glob("var/lib/apt/lists/*")]:  # fmt: skip
        if leftover.is_file():
            leftover.unlink()
    archive = folder / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], timeout=600, check=True)
    shutil.rmtree(rootfs)
    podman("import", str(archive), tag)
    archive.unlink()
    return tag


def pip_build_options(folder: Path) -> list[str]:
    """`podman build` options that give pip inside the build's RUN steps this machine's pip configuration:
    every setting that `pip config list` reports (its configuration files and the PIP_* environment, which
    wins) in one file, mounted as the build's /etc/pip.conf, and each local file or folder that a setting
    names (certificate, constraints, wheels, file:// indexes: their root, where the files beside simple/
    lie) mounted read-only at the same path."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60, check=True).stdout  # fmt: skip
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in ("global", "install", ":env:"):  # ':env:' holds the PIP_* environment
            settings[name] = str(ast.literal_eval(value))
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pip.conf"
    config.write_text("[global]\n" + "".join(f"{name} = {value}\n" for name, value in sorted(settings.items())))
    mounts = {f"{config}:/etc/pip.conf:ro"}
    for value in settings.values():
        for token in value.split():
            path = Path(urlparse(token).path) if token.startswith("file://") else Path(token)
            if token.startswith("file://") and path.name == "simple":
                path = path.parent
            if path.is_absolute() and path.exists():
                mounts.add(f"{path}:{path}:ro")
    return [option for mount in sorted(mounts) for option in ("--volume", mount)]

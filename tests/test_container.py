"""The container image (Containerfile), built and run here for real.

No registry of images is reachable from these machines, but Debian's archive is: a minimal Debian base
(python3 and its venv module) is made with debootstrap and imported into podman (once per test session), the
project's image is built on it with `podman build --isolation=chroot` (pip inside reaches PyPI and this
machine's wheels through this machine's pip configuration, mounted into the build, never written into the
image: tests/containers.py), and the demo runs inside the image's file system (a RUN step of a throw-away
build on top of it: `podman run` is refused here) and gives the outputs of the demo outside. The image holds
PyTorch's CPU build (build argument TORCH=torch==2.13.0+cpu, the wheel on this machine); the default for
users is PyPI's CUDA build. What is not tested here: apptainer, the .sif conversion and --nv (no machine
here has them; docs/cluster.md). Needs root, podman and debootstrap (installed with apt-get when missing).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from containers import Podman, debian_base, ensure_tools, pip_build_options
from runs import ABSENT_MODELS, REPO, line_with, snakemake, write_config

IMAGE = "localhost/virnucpro:test"
DEMO_IMAGE = "localhost/virnucpro-demo:test"
PUBLISHED_MODEL_NAMES = ("esm2_t36_3B_UR50D.pt", "300_model.pth", "500_model.pth", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def containerfile_arg(name: str) -> str:
    """The default of a build argument of the Containerfile."""
    return re.search(rf"^ARG {name}=(\S+)$", (REPO / "Containerfile").read_text(), flags=re.MULTILINE).group(1)


def torch_pin() -> str:
    """The project's PyTorch requirement (pyproject.toml)."""
    return re.search(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


@dataclass
class Built:
    podman: Podman
    folder: Path
    figures: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory):
    """The Debian base and the project's image built on it (CPU PyTorch), in a podman storage of their own that
    goes at the end of the session; build times and the image's size in `figures`."""
    ensure_tools()
    folder = tmp_path_factory.mktemp("container")
    podman = Podman(folder / "podman")
    try:
        started = time.monotonic()
        base = debian_base(podman, folder, "localhost/virnucpro-test-base:bookworm")
        figures = {"base_seconds": time.monotonic() - started}
        started = time.monotonic()
        podman("build", "--isolation=chroot", "--build-arg", f"BASE={base}", "--build-arg",
               f"TORCH={torch_pin()}+cpu", *pip_build_options(folder / "pip"), "--tag", IMAGE, "--file",
               str(REPO / "Containerfile"), str(REPO), timeout=1800)  # fmt: skip
        figures["build_seconds"] = time.monotonic() - started
        figures["image_bytes"] = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
        figures["base_bytes"] = int(podman("image", "inspect", "--format", "{{.Size}}", base).stdout)
        yield Built(podman, folder, figures)
    finally:
        podman.close()


def test_the_containerfile_pins_the_projects_torch_and_a_public_base():
    assert containerfile_arg("TORCH") == torch_pin()  # PyPI's build: CUDA on Linux x86_64
    assert containerfile_arg("BASE").startswith("docker.io/library/python:3.")


def test_an_apptainer_run_without_its_image_file_is_refused_at_start_saying_how_to_make_it(tmp_path):
    config = write_config(tmp_path, ABSENT_MODELS, {}, container="images/virnucpro.sif")
    result = snakemake(tmp_path, "-n", "--sdm", "apptainer", "--configfile", str(config), timeout=120)
    assert result.returncode != 0
    line = line_with(result.stdout, "config key 'container': no image file images/virnucpro.sif")
    assert "Containerfile" in line and "docs/cluster.md" in line
    assert snakemake(tmp_path, "-n", "--configfile", str(config), timeout=120).returncode == 0  # no apptainer: unused


@pytest.mark.slow
def test_the_demo_inside_the_image_gives_the_outputs_of_the_demo_outside(built, demo_outside):
    inside, context = built.folder / "inside", built.folder / "demo-context"
    inside.mkdir()
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {IMAGE}\n"
        "RUN VIRNUCPRO_DEMO_DIR=/out/run bash /src/scripts/demo.sh --no-setup > /out/demo.log 2>&1"
        " || (tail -n 80 /out/demo.log; exit 1)\n"
    )
    started = time.monotonic()
    built.podman("build", "--isolation=chroot", "--volume", f"{REPO}:/src:ro", "--volume", f"{inside}:/out",
                 "--tag", DEMO_IMAGE, str(context), timeout=1800)  # fmt: skip
    built.figures["demo_inside_seconds"] = time.monotonic() - started
    built.podman("rmi", DEMO_IMAGE)

    outside, output = demo_outside
    here, there = outside / "results", inside / "run" / "results"
    names = sorted(path.relative_to(here).as_posix() for path in here.rglob("*") if path.is_file())
    assert names == sorted(path.relative_to(there).as_posix() for path in there.rglob("*") if path.is_file())
    differ = [name for name in names if (here / name).read_bytes() != (there / name).read_bytes()]
    # The daemons' statistics differ by nature (host, process IDs, times, rates), and so does their plot; an
    # embedding's record names the model files by their fingerprint (sizes and times: the test models are
    # written anew inside) and is otherwise the same.
    statistics = {"run_stats.json", "daemons.png", "daemons/esm2-0.stats.json", "daemons/dnabert_s-0.stats.json"}
    records = [name for name in differ if name.startswith("demo/work/embeddings/") and name.endswith(".json")]
    assert set(differ) - set(records) <= statistics, differ
    for name in records:
        mine, theirs = json.loads((here / name).read_text()), json.loads((there / name).read_text())
        assert {**mine, "fingerprint": None} == {**theirs, "fingerprint": None}, name
    assert len(names) > 30 and "demo/prediction_results.txt" in names  # outputs, plots and every intermediate file
    closing = output[output.index("\ndemo: ") :].replace(str(outside), "/out/run")
    log = (inside / "demo.log").read_text()
    assert log[log.index("\ndemo: ") :] == closing
    print(f"\ncontainer: demo inside {built.figures['demo_inside_seconds']:.0f} s; {len(names)} files in results/, "
          f"{len(names) - len(differ)} identical inside and outside; differ: {', '.join(differ)}")  # fmt: skip


@pytest.mark.slow
def test_the_image_is_lean_and_holds_no_model(built):
    root = Path(built.podman("image", "mount", IMAGE).stdout.strip())
    try:
        venv = root / "opt" / "virnucpro"
        assert (venv / "bin" / "virnucpro").is_file() and (venv / "bin" / "snakemake").is_file()
        [site] = venv.glob("lib/python3*/site-packages")
        assert (site / "torch").is_dir()
        left = [venv / "bin" / "pip", site / "torch" / "include", site / "torch" / "test", root / "root" / ".cache",
                root / "etc" / "pip.conf"]  # fmt: skip
        left += [root / "usr" / "bin" / tool for tool in ("gcc", "cc", "c++", "make", "ld")]
        left += list((root / "var" / "lib" / "apt" / "lists").glob("*_Packages"))
        left += list((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        assert [str(path.relative_to(root)) for path in left if path.exists()] == []
        weights = [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()
                   and (path.name in PUBLISHED_MODEL_NAMES
                        or path.suffix in WEIGHT_SUFFIXES and path.stat().st_size > 10_000_000)]  # fmt: skip
        assert weights == []
        env = built.podman("image", "inspect", "--format", "{{.Config.Env}}", IMAGE).stdout
        assert "PATH=/opt/virnucpro/bin:" in env
    finally:
        built.podman("image", "unmount", IMAGE)
    figures = built.figures
    print(f"\ncontainer: debootstrap base {figures['base_seconds']:.0f} s ({figures['base_bytes'] / 1e6:.0f} MB), "
          f"image build {figures['build_seconds']:.0f} s, image {figures['image_bytes'] / 1e9:.2f} GB "
          f"({figures['image_bytes']} bytes, CPU PyTorch)")  # fmt: skip

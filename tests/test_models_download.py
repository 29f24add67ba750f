"""``virnucpro models download``: verified, resumable, atomic downloads, against a real local HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

import virnucpro.engines.download as models
from virnucpro.classify.classifier import load_classifier
from virnucpro.cli import main
from virnucpro.engines.dnabert import load_dnabert_s
from virnucpro.engines.download import MANIFEST, download_models, parse_base_url, resolve_base_urls
from virnucpro.engines.esm2 import load_esm2
from virnucpro.errors import UserError
from virnucpro.testmodels import write_published_classifier, write_random_checkpoint, write_random_snapshot

# --- a small model server: files under a root, GET with single "bytes=N-" ranges, a request log ---


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        range_header = self.headers.get("Range")
        self.server.requests.append((unquote(self.path), range_header))
        path = self.server.root / unquote(self.path).lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut_after.pop(unquote(self.path), None)
        self.wfile.write(body if cut is None else body[:cut])  # a cut transfer: fewer bytes than announced
        self.close_connection = cut is not None

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small models under the published names, laid out as a mirror: ``<root>/<group>/<remote path>``."""
    root = tmp_path_factory.mktemp("mirror")
    write_random_checkpoint(root / "esm2/models/esm2_t36_3B_UR50D.pt", seed=1)
    (root / "esm2/regression").mkdir()
    (root / "esm2/models/esm2_t36_3B_UR50D-contact-regression.pt").rename(
        root / "esm2/regression/esm2_t36_3B_UR50D-contact-regression.pt"
    )
    write_random_snapshot(root / "dnabert_s", seed=1, formats=("bin",))
    for length in (300, 500):
        write_published_classifier(root / f"classifiers/{length}_model.pth", input_dim=128, seed=length)
    return root


@pytest.fixture
def server(served: Path):
    server = _Server(served)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "RETRY_DELAY", 0.0)
    for name in ("VIRNUCPRO_MODELS_MIRROR", *(f"VIRNUCPRO_MODELS_BASE_URL_{g.upper()}" for g in models.GROUPS)):
        monkeypatch.delenv(name, raising=False)


def git_blob_id(path: Path) -> str:
    return subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served_path(root: Path, spec: models.ModelFile) -> Path:
    return root / spec.group / spec.remote


def manifest_for(root: Path, **wrong: str) -> list[models.ModelFile]:
    """The published manifest with the sizes and checksums of the served small files (``wrong``: local -> bad sha256)."""
    files = []
    for spec in MANIFEST:
        source = served_path(root, spec)
        if spec.git_sha1:
            spec = dataclasses.replace(spec, git_sha1=git_blob_id(source))
        else:
            spec = dataclasses.replace(spec, size=source.stat().st_size, sha256=sha256_of(source))
        if spec.local in wrong:
            spec = dataclasses.replace(spec, sha256=wrong[spec.local])
        files.append(spec)
    return files


def fetch(dest: Path, server: _Server, files, **options):
    return download_models(dest, files=files, base_urls=resolve_base_urls(mirror=server.url), **options)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob("*") if p.name.endswith((".part", ".tmp")))


# --- end to end ---


def test_download_fetches_every_file_verified_and_the_loaders_read_them(tmp_path, served, server):
    dest = tmp_path / "models"
    results = fetch(dest, server, manifest_for(served))
    assert [r.action for r in results] == ["downloaded"] * len(MANIFEST)
    for spec in MANIFEST:
        assert (dest / spec.local).read_bytes() == served_path(served, spec).read_bytes(), spec.local
    assert leftovers(dest) == []
    assert sorted(path for path, _ in server.requests) == sorted(f"/{s.group}/{s.remote}" for s in MANIFEST)

    paths = json.loads((dest / "models.json").read_text())
    assert paths == {
        "esm2": str((dest / "esm2_t36_3B_UR50D.pt").resolve()),
        "dnabert_s": str((dest / "DNABERT-S").resolve()),
        "classifier_300": str((dest / "300_model.pth").resolve()),
        "classifier_500": str((dest / "500_model.pth").resolve()),
    }
    assert load_esm2(Path(paths["esm2"])).embed(["MKV"]).vectors.shape == (1, 64)
    assert load_dnabert_s(Path(paths["dnabert_s"])).embed(["ACGT"]).vectors.shape == (1, 64)
    assert load_classifier(Path(paths["classifier_500"])).hidden_layer.in_features == 128
    sums = dict(line.split("  ")[::-1] for line in (dest / "SHA256SUMS").read_text().splitlines())
    assert sums == {spec.local: sha256_of(served_path(served, spec)) for spec in MANIFEST}


def test_a_partial_download_is_resumed_with_a_range_request(tmp_path, served, server):
    dest = tmp_path / "models"
    spec = next(s for s in manifest_for(served) if s.local == "esm2_t36_3B_UR50D.pt")
    whole = served_path(served, spec).read_bytes()
    half = len(whole) // 2
    dest.mkdir()
    (dest / "esm2_t36_3B_UR50D.pt.part").write_bytes(whole[:half])
    fetch(dest, server, [spec])
    assert server.requests == [("/esm2/models/esm2_t36_3B_UR50D.pt", f"bytes={half}-")]
    assert (dest / "esm2_t36_3B_UR50D.pt").read_bytes() == whole
    assert leftovers(dest) == []


def test_a_transfer_cut_short_is_retried_from_where_it_stopped(tmp_path, served, server):
    spec = next(s for s in manifest_for(served) if s.local == "300_model.pth")
    server.cut_after["/classifiers/300_model.pth"] = 1000
    fetch(tmp_path, server, [spec])
    assert server.requests == [("/classifiers/300_model.pth", None), ("/classifiers/300_model.pth", "bytes=1000-")]
    assert (tmp_path / "300_model.pth").read_bytes() == served_path(served, spec).read_bytes()


def test_a_checksum_mismatch_is_refused_and_leaves_nothing_in_place(tmp_path, served, server):
    dest = tmp_path / "models"
    files = manifest_for(served, **{"300_model.pth": "0" * 64})
    with pytest.raises(UserError, match=r"1 of 9 .*300_model\.pth: refused, .*sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch(dest, server, files)
    assert not (dest / "300_model.pth").exists()
    assert leftovers(dest) == []  # the bad bytes are not kept for a resume
    assert (dest / "500_model.pth").is_file() and (dest / "DNABERT-S/pytorch_model.bin").is_file()
    assert not (dest / "models.json").exists()  # not every model is there


def test_a_wrong_git_blob_id_is_refused(tmp_path, served, server):
    spec = dataclasses.replace(next(s for s in MANIFEST if s.local == "500_model.pth"), git_sha1="1" * 40)
    with pytest.raises(UserError, match=r"git blob id [0-9a-f]{40}, expected 1{40}"):
        fetch(tmp_path, server, [spec])
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_the_wrong_size_is_refused_before_it_is_downloaded(tmp_path, served, server):
    spec = next(s for s in MANIFEST if s.group == "esm2")  # the published 5.7 GB size
    with pytest.raises(UserError, match=r"offers \d+ bytes, expected 5678116398"):
        fetch(tmp_path, server, [spec])
    assert leftovers(tmp_path) == [] and not (tmp_path / spec.local).exists()


def test_a_resumed_part_that_turns_out_wrong_is_downloaded_again_from_scratch(tmp_path, served, server):
    spec = next(s for s in manifest_for(served) if s.local == "500_model.pth")
    whole = served_path(served, spec).read_bytes()
    (tmp_path / "500_model.pth.part").write_bytes(b"\0" * 100)  # not the file's first bytes
    fetch(tmp_path, server, [spec])
    assert server.requests == [("/classifiers/500_model.pth", "bytes=100-"), ("/classifiers/500_model.pth", None)]
    assert (tmp_path / "500_model.pth").read_bytes() == whole


def test_files_present_and_verified_are_skipped(tmp_path, served, server):
    files = manifest_for(served)
    fetch(tmp_path, server, files)
    server.requests.clear()
    again = fetch(tmp_path, server, files)
    assert {r.action for r in again} == {"present"}
    assert server.requests == []


def test_a_present_file_that_does_not_verify_is_replaced(tmp_path, served, server):
    spec = next(s for s in manifest_for(served) if s.local == "300_model.pth")
    (tmp_path / "300_model.pth").write_bytes(b"an older or damaged copy")
    assert [r.action for r in fetch(tmp_path, server, [spec])] == ["downloaded"]
    assert (tmp_path / "300_model.pth").read_bytes() == served_path(served, spec).read_bytes()


def test_a_missing_remote_file_is_reported_with_its_url(tmp_path, server):
    spec = models.ModelFile("classifiers", "no_such_model.pth", "no_such_model.pth")
    with pytest.raises(UserError, match=r"http://127\.0\.0\.1:\d+/classifiers/no_such_model\.pth: .*HTTP 404"):
        fetch(tmp_path, server, [spec])


# --- the command line ---


def test_cli_download_uses_the_mirror_from_the_environment(tmp_path, served, server, monkeypatch, capsys):
    monkeypatch.setenv("VIRNUCPRO_MODELS_MIRROR", server.url)
    dest = tmp_path / "models"
    assert main(["models", "download", "--dest", str(dest), "--only", "dnabert_s"]) == 0
    assert sorted(p.name for p in (dest / "DNABERT-S").iterdir()) == sorted(
        s.remote for s in MANIFEST if s.group == "dnabert_s"
    )
    load_dnabert_s(dest / "DNABERT-S")
    # the published manifest knows the ESM-2 file's size: the small stand-in is refused
    code = main(["models", "download", "--dest", str(dest), "--only", "esm2"])
    assert code == 2
    assert re.search(r"virnucpro models: error: .*offers \d+ bytes, expected 5678116398", capsys.readouterr().err)
    assert not (dest / "esm2_t36_3B_UR50D.pt").exists()


def test_cli_base_url_points_one_group_elsewhere(tmp_path, served, server):
    dest = tmp_path / "models"
    argv = ["models", "download", "--dest", str(dest), "--only", "classifiers"]
    assert main([*argv, "--base-url", f"classifiers={server.url}/classifiers"]) == 2  # published ids differ
    assert {path for path, _ in server.requests} == {"/classifiers/300_model.pth", "/classifiers/500_model.pth"}


# --- the manifest and the URLs ---


def test_base_urls_take_options_then_environment_then_defaults():
    env = {"VIRNUCPRO_MODELS_MIRROR": "http://m/", "VIRNUCPRO_MODELS_BASE_URL_ESM2": "http://e"}
    assert resolve_base_urls(environ={}) == models.BASE_URLS
    assert resolve_base_urls(environ=env) == {"esm2": "http://e", "dnabert_s": "http://m/dnabert_s",
                                              "classifiers": "http://m/classifiers"}  # fmt: skip
    assert resolve_base_urls({"dnabert_s": "http://d/"}, mirror="http://x", environ=env) == {
        "esm2": "http://x/esm2", "dnabert_s": "http://d", "classifiers": "http://x/classifiers"}  # fmt: skip


@pytest.mark.parametrize("text", ["esm2", "esm3=http://x", "=http://x", "esm2="])
def test_a_malformed_base_url_option_is_a_user_error(text):
    with pytest.raises(UserError, match="GROUP=URL"):
        parse_base_url(text)
    assert parse_base_url("DNABERT-S=http://x") == ("dnabert_s", "http://x")


def test_esm2_urls_are_those_fair_esm_downloads_from(monkeypatch):
    import esm.pretrained

    asked = []
    monkeypatch.setattr(esm.pretrained, "load_hub_workaround", lambda url: asked.append(url) or {})
    esm.pretrained._download_model_and_regression_data("esm2_t36_3B_UR50D")
    ours = [f"{models.BASE_URLS['esm2']}/{s.remote}" for s in MANIFEST if s.group == "esm2"]
    assert ours == asked


def test_the_manifest_lays_files_out_as_the_loaders_and_the_configuration_expect():
    local = {spec.local for spec in MANIFEST}
    assert {"esm2_t36_3B_UR50D.pt", "esm2_t36_3B_UR50D-contact-regression.pt", "300_model.pth",
            "500_model.pth", "DNABERT-S/config.json", "DNABERT-S/tokenizer.json",
            "DNABERT-S/pytorch_model.bin"} <= local  # fmt: skip
    assert all(spec.size or spec.sha256 or spec.git_sha1 for spec in MANIFEST if spec.group != "dnabert_s")
    assert models.BASE_URLS["dnabert_s"] == "https://huggingface.co/zhihan1996/DNABERT-S/resolve/main"


def test_importing_the_download_code_and_the_cli_does_not_import_torch():
    code = "import sys, virnucpro.cli, virnucpro.engines.download, virnucpro.engines.safeload; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

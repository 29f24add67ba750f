"""The published model files: where each comes from, its checksum, and a resumable, verified download.

``virnucpro models download`` fetches every file of ``MANIFEST`` into a destination folder laid out
as the configuration expects (``DIR/esm2_t36_3B_UR50D.pt`` with its contact-regression file beside
it, ``DIR/DNABERT-S/``, ``DIR/300_model.pth``, ``DIR/500_model.pth``). Each file is downloaded into
``<name>.part`` (resumed with an HTTP Range request when a ``.part`` is already there), checked
against the size and checksums that are known, and only then renamed to its final name. A file
already present and matching is skipped. See docs/models.md for the provenance of every entry.

The ``.part`` files keep their own rename rather than ``virnucpro.atomic``'s temporary files: a
``.part`` must outlive a failed run so that the next one resumes it. ``SHA256SUMS`` and
``models.json`` are written with ``virnucpro.atomic``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from virnucpro.atomic import write_text
from virnucpro.engines.dnabert_config import (
    BIN_FILE,
    CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)
from virnucpro.errors import UserError

log = logging.getLogger(__name__)

GROUPS = ("esm2", "dnabert_s", "classifiers")
BASE_URLS = {
    "esm2": "https://dl.fbaipublicfiles.com/fair-esm",
    "dnabert_s": "https://huggingface.co/zhihan1996/DNABERT-S/resolve/main",
    # the commit of Li-Jing-1997/VirNucPro that holds the published classifiers (plain git blobs)
    "classifiers": "https://raw.githubusercontent.com/Li-Jing-1997/VirNucPro/0f93f2755a7ea1acd3ff1bcf182892f960ef3326",
}
MIRROR_ENV = "VIRNUCPRO_MODELS_MIRROR"
"""A URL under which every group's files sit at ``<URL>/<group>/<remote path>``."""
BASE_URL_ENV = "VIRNUCPRO_MODELS_BASE_URL_{}"
"""Per group, e.g. ``VIRNUCPRO_MODELS_BASE_URL_ESM2``; it overrides the mirror for that group."""
DOWNLOAD_COMMAND = "virnucpro models download --dest DIR"
"""The command that fetches every published model file into DIR; the loaders' messages name it."""
RETRY_DELAY = 2.0
"""Seconds before the first retry of a dropped transfer; doubled for each further one (at most 30)."""
CHECKSUMS_FILE = "SHA256SUMS"
MODELS_JSON = "models.json"
MODEL_PATHS = {
    "esm2": "esm2_t36_3B_UR50D.pt",
    "dnabert_s": "DNABERT-S",
    "classifier_300": "300_model.pth",
    "classifier_500": "500_model.pth",
}
"""The configuration's model keys and where ``download`` puts each under the destination."""


@dataclass(frozen=True)
class ModelFile:
    """One file to fetch: ``remote`` under its group's base URL, ``local`` under the destination."""

    group: str
    remote: str
    local: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    """The file's git blob id (SHA-1 of ``blob <size>\\0`` + content), as the publishing repository records it."""


_DNABERT_S_FILES = (CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, BIN_FILE)

MANIFEST: tuple[ModelFile, ...] = (
    # size and sha256: no checksum is published by Meta; these values are recorded by several
    # independent projects that pin this exact download, and agree (docs/models.md)
    ModelFile(
        "esm2",
        "models/esm2_t36_3B_UR50D.pt",
        MODEL_PATHS["esm2"],
        size=5678116398,
        sha256="7de8b4082ba15891959ab368b77ce3886697af1efb16d3c9e9e7b0c5d3f07500",
    ),
    ModelFile(
        "esm2",
        "regression/esm2_t36_3B_UR50D-contact-regression.pt",
        "esm2_t36_3B_UR50D-contact-regression.pt",
        size=6759,
        sha256="4da500eab246481dc9c8c95bc7b1d02f2803d761c380b0e95186d4a07d0fc84e",
    ),
    # DNABERT-S: no size or checksum could be established offline; only completeness is checked
    *(ModelFile("dnabert_s", name, f"{MODEL_PATHS['dnabert_s']}/{name}") for name in _DNABERT_S_FILES),
    # the classifiers: their git blob ids in the VirNucPro repository at the pinned commit
    ModelFile(
        "classifiers",
        "300_model.pth",
        MODEL_PATHS["classifier_300"],
        git_sha1="a0b5b85e7c1e44f00cde146d091beb82b2c8e855",
    ),
    ModelFile(
        "classifiers",
        "500_model.pth",
        MODEL_PATHS["classifier_500"],
        git_sha1="fc35d5ef9f1f4564eea7036f34f4f8ec6000d33d",
    ),
)

Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class Fetched:
    """What ``download_models`` did with one file."""

    file: ModelFile
    path: Path
    action: str
    """``downloaded``, ``present`` (verified, skipped), ``present-unverified`` (no checksum known), ``failed``."""
    message: str = ""


class _Refused(Exception):
    """A downloaded file does not match what the manifest says it must be."""


def parse_base_url(text: str) -> tuple[str, str]:
    """``GROUP=URL`` -> ``(group, url)``, or a UserError saying what is expected."""
    group, sep, url = text.partition("=")
    group = group.strip().lower().replace("-", "_")
    if not sep or group not in GROUPS or not url.strip():
        raise UserError(f"--base-url '{text}': expected GROUP=URL with GROUP one of {', '.join(GROUPS)}")
    return group, url.strip()


def resolve_base_urls(
    overrides: Mapping[str, str] | None = None, mirror: str | None = None, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """Each group's base URL: ``overrides`` > ``mirror`` > per-group environment > mirror environment > default."""
    env_mirror = environ.get(MIRROR_ENV)
    urls = {}
    for group in GROUPS:
        env_group = environ.get(BASE_URL_ENV.format(group.upper()))
        if overrides and group in overrides:
            urls[group] = overrides[group]
        elif mirror:
            urls[group] = f"{mirror.rstrip('/')}/{group}"
        elif env_group:
            urls[group] = env_group
        elif env_mirror:
            urls[group] = f"{env_mirror.rstrip('/')}/{group}"
        else:
            urls[group] = BASE_URLS[group]
    return {group: url.rstrip("/") for group, url in urls.items()}


def download_models(
    dest: Path,
    *,
    files: Sequence[ModelFile] = MANIFEST,
    groups: Iterable[str] | None = None,
    base_urls: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    attempts: int = 3,
    timeout: float = 60.0,
) -> list[Fetched]:
    """Fetch ``files`` (those of ``groups``; all by default) into ``dest``, verified; skip those present and verified.

    Every file is tried; if any fails, a UserError lists them after the others are done.
    Writes ``dest/SHA256SUMS`` (the digests computed) and, once all model paths exist, ``dest/models.json``.
    """
    dest = Path(dest)
    wanted = set(groups) if groups else set(GROUPS)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise UserError(f"unknown model group(s) {', '.join(sorted(unknown))}: choose from {', '.join(GROUPS)}")
    urls = resolve_base_urls(base_urls)
    progress = progress or _LogProgress()
    results, digests = [], {}
    for spec in files:
        if spec.group not in wanted:
            continue
        final = dest / spec.local
        url = f"{urls[spec.group]}/{spec.remote}"
        try:
            action, digest = _obtain(spec, url, final, progress, attempts, timeout)
        except _Refused as error:
            results.append(Fetched(spec, final, "failed", str(error)))
            log.error("%s", error)
            continue
        if digest:
            digests[spec.local] = digest
        results.append(Fetched(spec, final, action))
    _record_checksums(dest, digests)
    _write_models_json(dest)
    failed = [result for result in results if result.action == "failed"]
    if failed:
        details = "; ".join(result.message for result in failed)
        raise UserError(f"{len(failed)} of {len(results)} model file(s) could not be obtained: {details}")
    return results


def _obtain(
    spec: ModelFile, url: str, final: Path, progress: Progress, attempts: int, timeout: float
) -> tuple[str, str | None]:
    """Make ``final`` hold the verified file; returns the action taken and the sha256 when computed."""
    if final.is_file():
        if not _knows_content(spec):
            log.info("%s: present (no checksum known, not re-checked)", final)
            return "present-unverified", None
        problem, digest = _verify(final, spec)
        if problem is None:
            log.info("%s: present and verified", final)
            return "present", digest
        log.warning("%s: present but %s; downloading it again", final, problem)
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    resumed = part.is_file() and part.stat().st_size > 0
    for fresh_start in (False, True):
        _fetch(url, part, spec, progress, attempts, timeout)
        problem, digest = _verify(part, spec)
        if problem is None:
            _fsync(part)
            os.replace(part, final)
            log.info("%s: downloaded from %s%s", final, url, "" if _knows_content(spec) else f" (sha256 {digest})")
            return "downloaded", digest
        part.unlink(missing_ok=True)  # bad bytes must not be resumed from
        if fresh_start or not resumed:
            break
        log.warning("%s: the resumed download %s; starting again from scratch", final, problem)
    raise _Refused(f"{url}: refused, the downloaded file {problem} (nothing was written to {final})")


def _knows_content(spec: ModelFile) -> bool:
    return spec.size is not None or spec.sha256 is not None or spec.git_sha1 is not None


def _verify(path: Path, spec: ModelFile) -> tuple[str | None, str]:
    """``(problem or None, sha256)`` of ``path`` against the size and checksums that ``spec`` knows."""
    size = path.stat().st_size
    hashes = [hashlib.sha256()]
    if spec.git_sha1 is not None:
        hashes.append(hashlib.sha1(f"blob {size}\0".encode()))
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            for hashed in hashes:
                hashed.update(block)
    digest = hashes[0].hexdigest()
    if spec.size is not None and size != spec.size:
        return f"has {size} bytes, expected {spec.size}", digest
    if spec.sha256 is not None and digest != spec.sha256:
        return f"has sha256 {digest}, expected {spec.sha256}", digest
    if spec.git_sha1 is not None and hashes[1].hexdigest() != spec.git_sha1:
        return f"has git blob id {hashes[1].hexdigest()}, expected {spec.git_sha1}", digest
    return None, digest


def _fetch(url: str, part: Path, spec: ModelFile, progress: Progress, attempts: int, timeout: float) -> None:
    """Bring ``part`` to the whole content of ``url``: resume it when it has bytes, retry dropped transfers."""
    import http.client
    import urllib.error

    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, spec, progress, timeout)
            return
        except urllib.error.HTTPError as error:
            if error.code not in (408, 429, 500, 502, 503, 504) or attempt == attempts:
                raise _Refused(f"{url}: the server answered HTTP {error.code} {error.reason}") from None
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            if attempt == attempts:
                raise _Refused(
                    f"{url}: download failed ({_reason(error)}); run the command again to resume from "
                    f"{part.name}, or use --base-url/--mirror to fetch from elsewhere"
                ) from None
            reason = _reason(error)
        log.warning("%s: %s; retrying (%d/%d)", url, reason, attempt + 1, attempts)
        time.sleep(min(RETRY_DELAY * 2 ** (attempt - 1), 30.0))


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return f"{type(error).__name__}: {reason}"


def _transfer(url: str, part: Path, spec: ModelFile, progress: Progress, timeout: float) -> None:
    """One HTTP GET into ``part``, from its current size when it has one (a Range request)."""
    import urllib.error
    import urllib.request

    from virnucpro import __version__

    have = part.stat().st_size if part.is_file() else 0
    if spec.size is not None and have > spec.size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": f"virnucpro/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            return  # nothing beyond what we have: verification decides whether it is whole
        raise
    with response:
        status = getattr(response, "status", None) or 200
        start, total = _range_of(response, status, have)
        if start != have:
            if start != 0:
                part.unlink()
                raise OSError(f"the server sent bytes from {start} when asked from {have}")
            have = 0  # the server sends the whole file: start over
        if spec.size is not None and total is not None and total != spec.size:
            raise _Refused(f"{url}: the server offers {total} bytes, expected {spec.size}; not downloading it")
        done = have
        with part.open("ab" if have else "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                progress(part.name.removesuffix(".part"), done, total)
    if total is not None and done < total:
        raise OSError(f"the transfer ended after {done} of {total} bytes")


def _range_of(response, status: int, have: int) -> tuple[int, int | None]:
    """``(first byte sent, total size or None)`` of a response to a request from byte ``have``."""
    if status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match:
            return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))
        return have, None
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


class _LogProgress:
    """Logs a download's progress at most every ``interval`` seconds, and when it completes."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._started: dict[str, tuple[float, int]] = {}

    def __call__(self, name: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        started, first = self._started.setdefault(name, (now, done))
        finished = total is not None and done >= total
        if not finished and now - self._last.get(name, started) < self.interval:
            return
        self._last[name] = now
        rate = (done - first) / max(now - started, 1e-9) / 1e6
        if total:
            log.info("%s: %.1f of %.1f MB (%d%%), %.1f MB/s", name, done / 1e6, total / 1e6, 100 * done // total, rate)
        else:
            log.info("%s: %.1f MB, %.1f MB/s", name, done / 1e6, rate)


def _record_checksums(dest: Path, digests: Mapping[str, str]) -> None:
    """Add the digests computed in this run to ``dest/SHA256SUMS`` (``sha256sum -c`` format)."""
    if not digests:
        return
    path = dest / CHECKSUMS_FILE
    known = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.partition("  ")
            if name:
                known[name] = digest
    known.update(digests)
    write_text(path, "".join(f"{digest}  {name}\n" for name, digest in sorted(known.items())))


def _write_models_json(dest: Path) -> None:
    """``dest/models.json``: the configuration's model keys and their paths, once every one exists."""
    paths = {key: (dest / local).resolve() for key, local in MODEL_PATHS.items()}
    if all(path.exists() for path in paths.values()):
        write_text(dest / MODELS_JSON, json.dumps({k: str(p) for k, p in paths.items()}, indent=2) + "\n")

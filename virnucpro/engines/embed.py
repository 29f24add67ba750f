"""Embedding a FASTA file with one model, and the embedding file format.

An embedding file is a ``torch.save``d dict ``{"ids": list[str], "embeddings": float32 tensor, "crc32":
int}``, one row per ID in the order of the FASTA file, readable with ``torch.load(path,
weights_only=True)``. ``crc32`` is the CRC-32 of the shape, the IDs and the tensor's bytes
(``embeddings_checksum``): torch itself reads a file whose tensor bytes were damaged without a word, so
``read_embeddings`` checks it. A truncated file has lost the zip end record that ``torch.save`` writes last:
``embedding_file_damage`` finds that without reading the tensors.
"""

from __future__ import annotations

import io
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from virnucpro.atomic import Check, atomic_output
from virnucpro.errors import UserError, environmental
from virnucpro.fasta import read_fasta

if TYPE_CHECKING:
    import torch

    from virnucpro.engines.embedded import Embedded

MODELS = ("esm2", "dnabert_s")
"""The embedding models, by their canonical names (the configuration's model keys)."""
MODEL_NAMES = ("esm2", "dnabert-s", "dnabert_s")
"""The model names accepted on the command line; ``canonical_model_name`` maps each to one of MODELS."""
PRECISIONS = ("fp32", "bf16", "fp16")
# A device setting for trials of a GPU cluster's setup without GPUs: the daemon takes a GPU slot (the
# workflow asks for gpu=1, SLURM binds a device and sets CUDA_VISIBLE_DEVICES) but computes on the CPU.
GPU_SLOT_CPU = "gpu-slot:cpu"
"""The precisions a model can run in (fp32: as published)."""

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """What a loaded model offers: its width and a batched ``embed``."""

    dim: int

    def embed(self, sequences: list[str]) -> Embedded: ...


def canonical_model_name(name: str) -> str:
    """Accept ``dnabert-s`` / ``dnabert_s`` / ``esm2`` and return the canonical name."""
    canonical = name.strip().lower().replace("-", "_")
    if canonical not in MODELS:
        raise UserError(f"unknown model '{name}': choose one of esm2, dnabert-s")
    return canonical


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of one of PRECISIONS."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


def load_embedder(
    model: str, weights: Path, device: str = "cpu", precision: str = "fp32", esm2_engine: str = "default"
) -> Embedder:
    """Load one embedding model from local files onto ``device``; ``esm2_engine``: ESM-2's engine paths
    (``virnucpro.engines.esm2_options``; DNABERT-S has one)."""
    from virnucpro.engines.esm2_options import parse_engine

    dtype = torch_dtype(precision)
    engine = parse_engine(esm2_engine)
    check_device(device)
    device = compute_device(device)
    model = canonical_model_name(model)
    if model == "esm2":
        from virnucpro.engines.esm2 import load_esm2

        return load_esm2(Path(weights), device=device, dtype=dtype, engine=engine)
    from virnucpro.engines.dnabert import load_dnabert_s

    return load_dnabert_s(Path(weights), device=device, dtype=dtype)


def model_files(weights: Path) -> list[Path]:
    """What a model is read from: a snapshot folder (DNABERT-S), or a checkpoint file and the fair-esm
    contact-regression companion beside it (ESM-2)."""
    from virnucpro.engines.esm2 import contact_regression_path

    weights = Path(weights)
    return [weights] if weights.is_dir() else [weights, contact_regression_path(weights)]


def compute_device(device: str) -> str:
    """The torch device that a device setting computes on (``gpu-slot:cpu`` computes on the CPU)."""
    return "cpu" if device == GPU_SLOT_CPU else device


def check_device(device: str) -> None:
    """Refuse a device string that torch cannot use here, with a message that says why."""
    import torch

    if device in ("cpu", GPU_SLOT_CPU):
        return
    if not device.startswith("cuda"):
        raise UserError(f"unknown device '{device}': use cpu, cuda or cuda:N (or {GPU_SLOT_CPU}, for trials)")
    if not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but no CUDA GPU is visible here; use --device cpu")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise UserError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) visible")


@dataclass(frozen=True)
class EmbedSummary:
    sequences: int
    """Sequences embedded (rows written)."""
    tokens: int
    failed: dict[str, str] = field(default_factory=dict)
    """Sequence ID -> why it has no row (it did not fit in GPU memory even alone)."""
    out_of_memory: int = 0
    """Out-of-memory errors met and recovered from by clearing the cache and splitting batches."""


def embed_records(
    embedder: Embedder, fasta_path: Path, output: Path, *, replace: bool = True, before_commit: Check | None = None
) -> EmbedSummary:
    """Embed every record of ``fasta_path`` with a loaded model and write ``output`` atomically.

    A sequence that cannot be embedded gets no row; it is named in the summary's ``failed``.
    With ``replace=False`` an existing ``output`` is never overwritten (FileExistsError instead).
    ``before_commit`` runs before the output is created and just before it is put in place
    (``virnucpro.atomic.atomic_path``): an error it raises leaves nothing written.
    """
    import torch

    records = list(read_fasta(Path(fasta_path)))
    ids = [record.id for record in records]
    if not records:
        write_embeddings(Path(output), [], torch.zeros((0, embedder.dim), dtype=torch.float32), replace=replace,
                         before_commit=before_commit)  # fmt: skip
        return EmbedSummary(sequences=0, tokens=0)
    embedded = embedder.embed([record.sequence for record in records])
    kept = [index for index in range(len(ids)) if index not in embedded.failed]
    vectors = embedded.vectors[torch.tensor(kept, dtype=torch.long)] if embedded.failed else embedded.vectors
    write_embeddings(Path(output), [ids[index] for index in kept], vectors, replace=replace,
                     before_commit=before_commit)  # fmt: skip
    return EmbedSummary(
        sequences=len(kept),
        tokens=embedded.tokens,
        failed={ids[index]: reason for index, reason in embedded.failed.items()},
        out_of_memory=embedded.out_of_memory,
    )


def embed_fasta(
    input_path: Path, model: str, weights: Path, output: Path, device: str = "cpu", precision: str = "fp32"
) -> EmbedSummary:
    """In-process embedding: load the model, embed the file, write ``output``."""
    embedder = load_embedder(model, weights, device=device, precision=precision)
    return embed_records(embedder, input_path, output)


def embed_shard(
    input_path: Path,
    model: str,
    weights: Path,
    output: Path,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    manifest: Path | None = None,
    sample: str = "",
    shard: str = "",
    on_failure: str = "fail",
) -> EmbedSummary | None:
    """In-process embedding of one workflow shard, recording what fails in the failure ``manifest``.

    Sequences that cannot be embedded get a manifest line each. A shard that cannot be embedded gets a
    line too; then with ``on_failure="record"`` ``output`` is written with no rows and None is returned,
    with ``"fail"`` the error is raised. A model that cannot be loaded always raises.
    """
    from virnucpro.manifest import record_embed_failures

    if on_failure not in ("fail", "record") or (on_failure == "record" and manifest is None):
        raise UserError("the failure policy must be 'fail', or 'record' with a failure manifest to record in")
    embedder = load_embedder(model, weights, device=device, precision=precision)
    shard_key = {"sample": sample, "stage": f"embed_{canonical_model_name(model)}", "shard": shard}
    try:
        summary = embed_records(embedder, Path(input_path), Path(output))
    except Exception as error:
        cause = environmental(error)
        if cause is not None:  # the machine, not the shard: nothing recorded, nothing written
            raise cause from None
        if manifest is not None:
            message = str(error).strip() or repr(error)
            record_embed_failures(manifest, **shard_key, shard_error=(type(error).__name__, message, 1))
        if on_failure == "fail":
            raise
        write_empty_embeddings(Path(output))
        log.warning("%s: %s: %s; recorded in %s; wrote %s with no rows (failure policy: record)", input_path,
                    type(error).__name__, error, manifest, output)  # fmt: skip
        return None
    if manifest is not None:
        record_embed_failures(manifest, **shard_key, sequence_failures=summary.failed)
    return summary


def write_empty_embeddings(path: Path) -> None:
    """An embedding file with no rows (and width 0): what a shard whose embedding failed gets under the
    ``record`` failure policy, so that classification and the per-read account can go on."""
    import torch

    write_embeddings(path, [], torch.zeros((0, 0), dtype=torch.float32))


def write_embeddings(
    path: Path, ids: list[str], vectors: torch.Tensor, *, replace: bool = True, before_commit: Check | None = None
) -> None:
    """Write an embedding file atomically (temporary file in the same folder, then rename), with its
    checksum; with ``replace=False`` an existing ``path`` is kept and FileExistsError raised (never
    overwritten); ``before_commit``: as for ``embed_records``."""
    import torch

    if vectors.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} IDs but {vectors.shape[0]} embedding rows")
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    data = {"ids": list(ids), "embeddings": vectors, "crc32": embeddings_checksum(ids, vectors)}
    buffer = io.BytesIO()  # serialized in memory, so that a failed write is a plain OSError (e.g. no space)
    torch.save(data, buffer)
    with atomic_output(Path(path), "wb", replace=replace, before_commit=before_commit) as handle:
        handle.write(buffer.getbuffer())


def embeddings_checksum(ids: list[str], vectors: torch.Tensor) -> int:
    """The CRC-32 of an embedding file's content: its shape, its IDs and the bytes of its float32 vectors."""
    import torch

    crc = zlib.crc32(json.dumps([list(vectors.shape), ids]).encode("utf-8"))
    return zlib.crc32(vectors.detach().to("cpu", torch.float32).contiguous().numpy().data, crc)


def read_embeddings(path: Path) -> tuple[list[str], torch.Tensor]:
    """Read an embedding file without unpickling anything but tensors and plain containers; a file that
    is truncated or corrupt (its checksum does not match) raises UserError naming it."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: embedding file not found") from None
    except Exception as error:  # torch says OSError (EINVAL), RuntimeError, UnpicklingError, EOFError, ...
        if environmental(error) is not None:
            raise
        raise DamagedEmbeddings(path, f"{type(error).__name__}: {str(error).strip()}".split(". ")[0][:200]) from None
    if not isinstance(data, dict) or not isinstance(data.get("ids"), list) or "embeddings" not in data:
        raise UserError(f"{path}: not an embedding file (expected a dict with 'ids' and 'embeddings')")
    ids, vectors = data["ids"], data["embeddings"]
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise DamagedEmbeddings(path, "'embeddings' is not a 2-D tensor with one row per ID")
    if "crc32" in data and data["crc32"] != embeddings_checksum(ids, vectors):  # (files of older versions have none)
        raise DamagedEmbeddings(path, "its checksum does not match its content")
    return ids, vectors


def embedding_file_damage(path: Path, *, whole: bool = False) -> str | None:
    """Why an existing embedding file is truncated or damaged, judged from its zip structure alone (the end
    record and the central directory, a few hundred bytes), or with ``whole`` also by reading it and
    comparing its checksum; None if it looks whole."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"not a whole zip archive: {error}"
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "no data.pkl in its zip archive"
    if whole:
        try:
            read_embeddings(path)
        except DamagedEmbeddings as error:
            return error.cause
    return None


class DamagedEmbeddings(UserError):
    """An embedding file that is truncated or corrupt; ``cause`` says how it shows."""

    def __init__(self, path: Path, cause: str):
        super().__init__(f"{path}: the embedding file is truncated or corrupt ({cause}); delete it and run again")
        self.cause = cause

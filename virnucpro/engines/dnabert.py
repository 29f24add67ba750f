"""DNABERT-S nucleotide embeddings, from the published snapshot folder, with a native encoder.

The published tool runs ``zhihan1996/DNABERT-S`` through ``trust_remote_code`` one sequence at a
time and takes the mean of the last hidden state over all tokens, ``[CLS]`` and ``[SEP]`` included.
Here the same encoder (DNABERT-2 architecture, see docs/dnabert-s-format.md) is written in plain
PyTorch, reads the snapshot's own files (never its code), and runs padded batches whose padding is
masked out of the attention and of the mean, so that every vector equals the one-at-a-time one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.engines.dnabert_config import (
    BERT_PREFIX,
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    TOKENIZER_FILE,
    DnabertConfig,
    read_config,
)
from virnucpro.engines.download import DOWNLOAD_COMMAND, MODEL_PATHS
from virnucpro.errors import UserError

if TYPE_CHECKING:
    import tokenizers
    import torch

    from virnucpro.engines.dnabert_model import DnabertEncoder
    from virnucpro.engines.embedded import Embedded

FIX_HINT = (
    f"put the published zhihan1996/DNABERT-S files there: '{DOWNLOAD_COMMAND}' writes them to "
    f"DIR/{MODEL_PATHS['dnabert_s']}"
)
"""What the user can do about a missing or broken snapshot: ends every snapshot error message."""
_UNUSED = ("cls.", "pooler.")
"""Published tensors that the encoder does not use: the MLM head and the pooler."""


def select_tensors(raw: dict[str, Any], expected: dict[str, tuple[int, ...]], source: Path) -> dict[str, Any]:
    """The tensors of ``expected`` (published names) from a checkpoint's ``raw`` tensors.

    Names may carry a ``bert.`` prefix; the MLM head (``cls.*``) and the pooler are left out.
    A missing or mis-shaped tensor raises a UserError naming ``source`` and the tensor.
    """
    found = {}
    for name, tensor in raw.items():
        bare = name[len(BERT_PREFIX) :] if name.startswith(BERT_PREFIX) else name
        if not bare.startswith(_UNUSED):
            found[bare] = (name, tensor)
    selected = {}
    for name, shape in expected.items():
        if name not in found:
            raise UserError(
                f"{source}: tensor '{name}' (or '{BERT_PREFIX}{name}') is missing; "
                f"the file is not a DNABERT-S checkpoint matching config.json; {FIX_HINT}"
            )
        stored_name, tensor = found[name]
        if tuple(tensor.shape) != shape:
            raise UserError(
                f"{source}: tensor '{stored_name}' has shape {list(tensor.shape)}, config.json "
                f"requires {list(shape)}; the weights and config.json do not belong together; {FIX_HINT}"
            )
        selected[name] = tensor
    return selected


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that batch size x longest length <= ``max_tokens``.

    A sequence longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


class DnabertS:
    """A loaded DNABERT-S: its tokenizer and encoder on one device."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, encoder: DnabertEncoder, device: str) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.dim: int = encoder.cfg.hidden_size
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0

    def tokenize(self, sequence: str) -> list[int]:
        """Token ids as the published tool feeds them: ``[CLS]`` ... ``[SEP]``."""
        return self.tokenizer.encode(sequence).ids

    def embed(self, sequences: list[str], max_tokens_per_batch: int = 16384) -> Embedded:
        """Mean of the last hidden state over each sequence's tokens (specials included), in input order.

        A batch that runs out of GPU memory is split in halves and retried after clearing the cache;
        a sequence that does not fit even alone is left out: its row is NaN and ``failed`` says why.
        On a GPU the batches are queued without waiting for the device, and the vectors are copied
        back once at the end.
        """
        import torch

        from virnucpro.engines.embedded import Embedded, run_splitting_on_oom, to_device

        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(sequences))]
        lengths = [len(row) for row in ids]
        vectors = torch.full((len(ids), self.dim), float("nan"), dtype=torch.float32, device=self.device)

        def run(batch: list[int]) -> None:
            longest = max(lengths[index] for index in batch)
            input_ids = torch.full((len(batch), longest), self._pad_id, dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, : lengths[index]] = torch.tensor(ids[index], dtype=torch.long)
            counts = torch.tensor([lengths[index] for index in batch])
            input_ids, counts, rows = (to_device(t, self.device) for t in (input_ids, counts, torch.tensor(batch)))
            real = torch.arange(longest, device=input_ids.device)[None, :] < counts[:, None]
            hidden = self.encoder(input_ids, real).float()
            sums = (hidden * real[..., None]).sum(dim=1)
            vectors.index_copy_(0, rows, sums / counts[:, None])

        failed: dict[int, str] = {}
        out_of_memory = 0
        with torch.inference_mode():
            for batch in token_batches(lengths, max_tokens_per_batch):
                outcome = run_splitting_on_oom(batch, run, self._clear_cache, lambda i: f"{lengths[i]} tokens")
                failed.update(outcome.failed)
                out_of_memory += outcome.out_of_memory
        tokens = sum(length for index, length in enumerate(lengths) if index not in failed)
        return Embedded(vectors=vectors.cpu(), tokens=tokens, failed=failed, out_of_memory=out_of_memory)

    def _clear_cache(self) -> None:
        import torch

        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()


def load_dnabert_s(
    snapshot_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None, compile_model: bool = False
) -> DnabertS:
    """Load a published DNABERT-S snapshot folder onto ``device`` (fp32 unless ``dtype`` says otherwise);
    ``compile_model`` runs the encoder through ``torch.compile``."""
    import torch

    from virnucpro.engines.dnabert_model import build_encoder, expected_shapes

    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        what = "is a file, not the snapshot folder" if snapshot_dir.exists() else "folder not found"
        raise UserError(f"DNABERT-S snapshot {what}: {snapshot_dir}; {FIX_HINT}")
    config_path = _required(snapshot_dir, CONFIG_FILE)
    try:
        config = read_config(config_path)
    except UserError as error:  # the format's own message: what is wrong; add what to do
        raise UserError(f"{error}; {FIX_HINT}") from None
    tokenizer = _read_tokenizer(_required(snapshot_dir, TOKENIZER_FILE), config)
    source, raw = _read_weights(snapshot_dir)
    tensors = select_tensors(raw, expected_shapes(config), source)
    encoder = build_encoder(config, tensors)
    encoder.to(device=device, dtype=dtype or torch.float32)
    if compile_model:
        encoder = torch.compile(encoder, dynamic=True)
    return DnabertS(tokenizer, encoder, device)


def _required(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise UserError(f"{directory}: {name} is missing (looked for {path}); {FIX_HINT}")
    return path


def _read_tokenizer(path: Path, config: DnabertConfig) -> tokenizers.Tokenizer:
    """The snapshot's tokenizer, checked to add [CLS]/[SEP] and to fit the embedding table."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception on a bad file
        raise UserError(f"{path}: not a tokenizer file the tokenizers library can read ({error}); {FIX_HINT}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    ids = tokenizer.encode("A").ids
    if cls is None or sep is None or ids[0] != cls or ids[-1] != sep:
        raise UserError(f"{path}: the tokenizer does not wrap sequences in [CLS] ... [SEP]; {FIX_HINT}")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(
            f"{path}: {tokenizer.get_vocab_size()} tokens, more than config.json's vocab_size "
            f"{config.vocab_size}; the tokenizer and the weights do not belong together; {FIX_HINT}"
        )
    return tokenizer


def _read_weights(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The weights file (model.safetensors preferred over pytorch_model.bin) and its tensors."""
    safetensors_path, bin_path = directory / SAFETENSORS_FILE, directory / BIN_FILE
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return safetensors_path, load_file(safetensors_path)
        except (OSError, SafetensorError) as error:
            raise UserError(f"{safetensors_path}: not a readable safetensors file ({error}); {FIX_HINT}") from None
    if bin_path.is_file():
        from virnucpro.engines.safeload import load_state_dict

        return bin_path, load_state_dict(bin_path, hint=FIX_HINT)
    raise UserError(f"{directory}: no weights, neither {SAFETENSORS_FILE} nor {BIN_FILE}; {FIX_HINT}")

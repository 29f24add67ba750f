"""ESM-2 protein embeddings from a fair-esm checkpoint, loaded without unpickling arbitrary objects.

The published checkpoint (``esm2_t36_3B_UR50D.pt``) is a ``torch.save``d dict: ``cfg`` ->
``{"model": argparse.Namespace(encoder_layers=..., ...)}`` and ``model`` -> a fp16 state dict whose
keys carry the prefixes ``encoder.sentence_encoder.`` and ``encoder.lm_head.``; beside it sits
``<name>-contact-regression.pt`` (``{"model": {"contact_head.regression.*": ...}}``). fair-esm's own
loader fails under torch>=2.6 and, made to work, unpickles anything; ``load_esm2`` reads the same
files with torch's weights-only unpickler that allows ``argparse.Namespace`` and nothing more.

Loading is lean: the file is memory-mapped, the model is built on the ``meta`` device (no random
weights are ever allocated), and each tensor is copied straight into its target device and dtype,
after which its mapped pages are given back; so the host holds one copy of the weights at most.

The contact-regression companion is not needed for embeddings: when it is missing, fair-esm refuses
the checkpoint, ``load_esm2`` only logs a warning and leaves the (unused) contact head at zero.

The forward pass runs on PyTorch's fused attention (``virnucpro.engines.esm2_model.SdpaESM2``: fair-esm's
model with a representations-only forward), equal to fair-esm's own in fp32 to float rounding;
``attention="fair-esm"`` runs fair-esm's forward instead. Proteins are tokenized as fair-esm's
alphabet does, one-letter tokens by table lookup (fair-esm's tokenizer took 1 ms per protein).

How the engine batches and computes is chosen by ``engine`` (``virnucpro.engines.esm2_options``: packed
batches on variable-length attention, fused q/k/v, compiled layers, CUDA graphs, overlapped copies);
the default is the engine described here, and every choice gives its vectors to float rounding.

Long proteins are handled as the published VirNucPro does (see docs/models.md): the whole protein
goes through the model (no ``truncation_seq_length``; fair-esm's extract.py would cut it to 1022
residues), and the vector is the mean over residues 1 .. min(1024, len).
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.engines.download import DOWNLOAD_COMMAND, MODEL_PATHS
from virnucpro.errors import UserError

if TYPE_CHECKING:
    import torch

    from virnucpro.engines.embedded import Embedded
    from virnucpro.engines.esm2_options import EngineOptions

log = logging.getLogger(__name__)

MEAN_POSITIONS = 1024
"""The published vector is the mean of the representations at positions 1 .. min(1024, len)."""
TOKS_PER_BATCH = 2048
"""The published token budget per batch (fair-esm's ``get_batch_indices``, ``extra_toks_per_seq=1``)."""
GPU_TOKS_PER_BATCH = 16384
"""The default budget on a GPU: bigger matrix products, fewer launches; the vectors do not depend on it."""
ATTENTION = ("sdpa", "fair-esm")
ROTARY_FREQUENCIES = "rot_emb.inv_freq"
"""The name ending of each layer's rotary frequencies (a buffer: not a trained weight, fp32 in fair-esm)."""
WARM_UP = ("MKVLAAGIIGLW" * 3, "ACDEFGHIKLMNPQRSTVWY" * 4)
"""Two proteins of other lengths embedded when the layer is compiled (two, so that no size is 1)."""
ALPHABET = "ESM-1b"
"""fair-esm's name of the alphabet (token table) that ESM-2 uses: ``esm.data.Alphabet.from_architecture(ALPHABET)``."""

_PREFIXES = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
CONTACT_HEAD = "contact_head."
"""The prefix of the contact head's weights, which come from the contact-regression companion file."""
_CFG_FIELDS = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")
_HINT = (
    f"get the published ESM-2 3B with '{DOWNLOAD_COMMAND}' "
    f"(writes DIR/{MODEL_PATHS['esm2']} and its contact-regression file), or point to another fair-esm ESM-2 checkpoint"
)


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the published prefixes ``encoder.sentence_encoder.`` / ``encoder.`` from the keys."""
    return {_PREFIXES.sub("", name): tensor for name, tensor in state.items()}


class Esm2Embedder:
    """A loaded ESM-2 model that embeds proteins exactly as the published extraction does.

    ``model`` is called as ``model(tokens, repr_layers=[layer])`` on padded batches; it may be replaced by
    any callable with that signature (tests wrap it to inject out-of-memory errors). ``options`` (see
    ``virnucpro.engines.esm2_options``) chooses the engine's paths; ``set_options`` changes them.
    """

    def __init__(self, model: Any, alphabet: Any, layer: int, toks_per_batch: int) -> None:
        from virnucpro.engines.esm2_options import EngineOptions

        self.model = model
        self.alphabet = alphabet
        self.layer = layer
        self.toks_per_batch = toks_per_batch
        self.dim: int = model.embed_dim
        self.num_layers: int = model.num_layers
        self.device: torch.device = model.embed_tokens.weight.device
        self.options = EngineOptions()
        self.packed_forward: Any = None
        """``f(PackedBatch) -> [S, E]`` float32 means on the device, when ``options.packed``."""
        self._letters = _letter_table(alphabet)
        self._special = {name: getattr(alphabet, f"{name}_idx") for name in ("cls", "eos", "padding", "mask")}

    def set_options(self, options: EngineOptions | str) -> None:
        """Switch the engine's paths (``EngineOptions`` or the setting's text); the default is today's engine."""
        import torch

        from virnucpro.engines import esm2_packed
        from virnucpro.engines.esm2_model import SdpaESM2
        from virnucpro.engines.esm2_options import parse_engine

        options = parse_engine(options)
        model = self.model
        if not options.is_default and not isinstance(model, SdpaESM2):
            raise ValueError(f"the ESM-2 engine setting '{options}' needs attention='sdpa'")
        if isinstance(model, SdpaESM2):
            model.configure(fused_qkv=options.fused_qkv, compile_regions=options.compile)
        self.options, self.packed_forward = options, None
        if options.packed:
            attention = model.layers[0].self_attn
            attend, how = esm2_packed.choose_attention(self.device, model.embed_tokens.weight.dtype,
                                                       attention.num_heads, attention.head_dim)  # fmt: skip
            forward = partial(_packed_means, model, self.layer, attend)
            if options.cuda_graphs and self.device.type == "cuda":
                forward = esm2_packed.GraphedForward(forward)
            elif options.cuda_graphs:
                how += "; no CUDA: cuda-graphs keeps only its bucketed shapes"
            self.packed_forward = forward
            log.info("ESM-2 engine %s (torch %s): %s", options, torch.__version__, how)
        elif not options.is_default:
            log.info("ESM-2 engine %s (torch %s)", options, torch.__version__)
        if options.compile:  # compiled now, at load, rather than in the first shard (dynamic shapes: once)
            self.embed(list(WARM_UP))

    def encode(self, sequence: str) -> list[int]:
        """The protein's token ids without ``<cls>``/``<eos>``, as fair-esm's ``alphabet.encode`` gives them."""
        if sequence.isascii():
            ids = [self._letters[code] for code in sequence.encode("ascii")]
            if -1 not in ids:
                return ids
        return self.alphabet.encode(sequence)

    def embed(self, sequences: list[str]) -> Embedded:
        """Mean representation of ``layer`` over residues 1..min(1024, len), one row per sequence in input order.

        Batches as published (sorted by length, ``toks_per_batch``), or packed to the budget with
        ``options.packed``. A batch that runs out of GPU memory is split in halves and retried after
        clearing the cache; a protein that does not fit even alone is left out: its row is NaN and
        ``failed`` says why. On a GPU the batches are queued without waiting for the device; the vectors
        are copied back once at the end, or batch by batch on a side stream with ``options.overlap``.
        """
        import torch
        from esm.data import FastaBatchedDataset

        from virnucpro.engines.embedded import Embedded, run_splitting_on_oom
        from virnucpro.engines.esm2_packed import packed_batches
        from virnucpro.engines.pipeline import Transfers, VectorSink, prefetched

        for index, sequence in enumerate(sequences):
            if not sequence:
                raise UserError(f"protein sequence #{index + 1} is empty: ESM-2 cannot embed an empty protein")
        if self.options.packed:
            batches = packed_batches([len(sequence) for sequence in sequences], self.toks_per_batch)
        else:
            dataset = FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
            batches = [list(batch) for batch in dataset.get_batch_indices(self.toks_per_batch, extra_toks_per_seq=1)]
        transfers = Transfers(self.device, side_stream=self.options.overlap)
        sink = VectorSink(len(sequences), self.dim, self.device, streamed=self.options.overlap)

        def prepare(batch: list[int]) -> Any:
            return transfers.pin(self._prepare(sequences, batch))

        def run(ready: tuple[list[int], Any], batch: list[int]) -> None:
            prepared = ready[1] if batch == ready[0] else prepare(batch)  # a part of a split batch: prepared now
            sink.put(batch, self._compute(transfers.upload(prepared)))

        failed: dict[int, str] = {}
        out_of_memory = 0
        with torch.inference_mode():
            for ready in prefetched(batches, prepare, background=self.options.overlap):
                outcome = run_splitting_on_oom(
                    list(ready[0]), partial(run, ready), self._clear_cache, lambda i: f"{len(sequences[i])} residues"
                )
                failed.update(outcome.failed)
                out_of_memory += outcome.out_of_memory
        tokens = sum(len(s) + 2 for i, s in enumerate(sequences) if i not in failed)
        return Embedded(vectors=sink.result(), tokens=tokens, failed=failed, out_of_memory=out_of_memory)

    def _prepare(self, sequences: list[str], batch: list[int]) -> Any:
        """The host tensors of one batch: padded (``_PaddedBatch``) or packed (``PackedBatch``)."""
        import torch

        from virnucpro.engines.esm2_packed import pack

        encoded = [self.encode(sequences[i]) for i in batch]
        if self.options.packed:
            # the published mean covers positions 1..min(1024, len(string)) of what the protein's tokens hold
            ends = [min(MEAN_POSITIONS, len(sequences[i]), len(ids) + 1) for i, ids in zip(batch, encoded)]
            budget = self.toks_per_batch if self.options.bucketed else None
            return pack(encoded, ends, self._special, bucket_budget=budget)
        tokens = self._tokens(encoded)
        # the published mean covers positions 1..min(1024, len(string)) of what the row holds
        ends = torch.tensor([min(MEAN_POSITIONS, len(sequences[i]), tokens.shape[1] - 1) for i in batch])
        return _PaddedBatch(tokens, ends)

    def _compute(self, batch: Any) -> torch.Tensor:
        """The batch's mean vectors [B, E], float32 on the device, in the batch's order."""
        import torch

        if self.options.packed:
            return self.packed_forward(batch)[: batch.count]
        tokens, ends = batch.tokens, batch.ends
        representations = self.model(tokens, repr_layers=[self.layer])["representations"][self.layer]
        positions = torch.arange(tokens.shape[1], device=self.device)
        take = (positions[None, :] >= 1) & (positions[None, :] <= ends[:, None])
        if self.options.device_mean:  # reduced in fp32 from the model's dtype: no fp32 copy of the padded batch
            sums = representations.masked_fill(~take[..., None], 0).sum(dim=1, dtype=torch.float32)
        else:
            sums = (representations.float() * take[..., None]).sum(dim=1)
        return sums / ends[:, None]

    def _tokens(self, encoded: list[list[int]]) -> torch.Tensor:
        """``<cls>`` ids ``<eos>`` per row, padded: what fair-esm's batch converter returns."""
        import torch

        alphabet = self.alphabet
        tokens = torch.full((len(encoded), max(map(len, encoded)) + 2), alphabet.padding_idx, dtype=torch.int64)
        tokens[:, 0] = alphabet.cls_idx
        for row, ids in enumerate(encoded):
            tokens[row, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.int64)
            tokens[row, len(ids) + 1] = alphabet.eos_idx
        return tokens

    def _clear_cache(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class _PaddedBatch:
    """A padded batch: tokens [B, T] as fair-esm's batch converter makes them, and each row's mean end [B]."""

    tokens: torch.Tensor
    ends: torch.Tensor

    def map(self, move: Any) -> _PaddedBatch:
        return _PaddedBatch(move(self.tokens), move(self.ends))


def _packed_means(model: Any, layer: int, attend: Any, batch: Any) -> torch.Tensor:
    from virnucpro.engines.esm2_packed import packed_means, packed_representation

    return packed_means(packed_representation(model, batch, layer, attend), batch)


def _letter_table(alphabet: Any) -> list[int]:
    """Token id of each ASCII code that is a one-letter token of the alphabet, -1 for the others."""
    table = [-1] * 128
    for token in alphabet.all_toks:
        if len(token) == 1 and token.isascii() and not token.isspace():
            table[ord(token)] = alphabet.get_idx(token)
    return table


def load_esm2(
    checkpoint: Path,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    layer: int | None = None,
    toks_per_batch: int | None = None,
    attention: str = "sdpa",
    engine: EngineOptions | str = "default",
) -> Esm2Embedder:
    """Load a published-format ESM-2 checkpoint onto ``device`` (fp32 unless ``dtype``, last layer unless ``layer``).

    ``toks_per_batch``: the published 2048 on the CPU, ``GPU_TOKS_PER_BATCH`` on a GPU unless given.
    ``attention``: ``"sdpa"`` (PyTorch's fused attention, see ``virnucpro.engines.esm2_model``) or ``"fair-esm"``
    (fair-esm's own forward). ``engine``: the engine's paths (``virnucpro.engines.esm2_options``; sdpa only).
    With sdpa each layer's q, k, v projections are placed in one concatenated tensor that they view.
    """
    import torch
    from esm.data import Alphabet

    from virnucpro.engines.safeload import MappedPages, load_allowlisted

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        what = "is a folder, not the checkpoint file" if checkpoint.is_dir() else "not found"
        raise UserError(f"ESM-2 checkpoint {what}: {checkpoint}; {_HINT}")
    if toks_per_batch is None:
        toks_per_batch = GPU_TOKS_PER_BATCH if torch.device(device).type == "cuda" else TOKS_PER_BATCH
    if toks_per_batch < 1:
        raise UserError(f"ESM-2 batch token budget must be positive, got {toks_per_batch}")
    data = load_allowlisted(checkpoint, [argparse.Namespace], mmap=True, hint=_HINT)
    cfg = _esm2_config(checkpoint, data)
    state = upgrade_state_dict(data["model"])
    del data
    num_layers = cfg.encoder_layers
    if layer is None:
        layer = num_layers
    if not 0 <= layer <= num_layers:
        raise UserError(f"{checkpoint}: layer {layer} does not exist; this ESM-2 model has layers 0..{num_layers}")
    if not checkpoint.name.startswith("esm2"):
        log.warning(
            "%s: the file name does not start with 'esm2', so fair-esm would not read it as ESM-2; "
            "reading it as ESM-2 because its cfg describes one",
            checkpoint,
        )
    state.update(_contact_regression(checkpoint))

    alphabet = Alphabet.from_architecture(ALPHABET)
    model_class = _model_class(attention)
    with torch.device("meta"):
        model = model_class(
            num_layers=cfg.encoder_layers,
            embed_dim=cfg.encoder_embed_dim,
            attention_heads=cfg.encoder_attention_heads,
            alphabet=alphabet,
            token_dropout=cfg.token_dropout,
        )
    _check_state(checkpoint, model, state)
    pages, target = MappedPages(checkpoint), torch.device(device)
    # the fused path keeps the rotary frequencies in fp32 (fair-esm's own forward needs them in the model dtype)
    rotary = {
        name: state.pop(name) for name in list(state) if attention == "sdpa" and name.endswith(ROTARY_FREQUENCIES)
    }
    fused = []
    if attention == "sdpa":
        views, fused = place_fused_projections(state, num_layers, target, dtype or torch.float32, pages)
    weights = place_tensors(state, target, dtype or torch.float32, pages)
    weights.update(place_tensors(rotary, target, torch.float32, pages))
    if attention == "sdpa":
        weights.update(views)
    model.load_state_dict(weights, strict=True, assign=True)
    model.lm_head.weight = model.embed_tokens.weight  # the published model ties these two
    if attention == "sdpa":
        model.share_rotary_buffers()
        model.attach_fused_qkv(fused)
    model.eval()
    embedder = Esm2Embedder(model, alphabet, layer, toks_per_batch)
    embedder.set_options(engine)
    return embedder


def _model_class(attention: str) -> type:
    if attention == "fair-esm":
        from esm.model.esm2 import ESM2

        return ESM2
    from virnucpro.engines.esm2_model import SdpaESM2

    return SdpaESM2


def place_fused_projections(
    state: dict[str, torch.Tensor], num_layers: int, device: torch.device, dtype: torch.dtype, pages: Any = None
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Copy each layer's q, k, v projection weights and biases (taken out of ``state``) into one [3E, E] weight
    and one [3E] bias on ``device`` in ``dtype``; returns the three parts of each as views named as in
    ``state``, and the concatenated (weight, bias) per layer. Each source's mapped pages are given back
    once copied (``pages``), so the host never holds a second copy of the weights."""
    import torch

    views: dict[str, torch.Tensor] = {}
    fused = []
    for index in range(num_layers):
        pair = []
        for kind in ("weight", "bias"):
            names = [f"layers.{index}.self_attn.{letter}_proj.{kind}" for letter in "qkv"]
            first = state[names[0]]
            target = torch.empty((3 * first.shape[0], *first.shape[1:]), dtype=dtype, device=device)
            for part, name in zip(target.chunk(3), names, strict=True):
                source = state.pop(name)
                part.copy_(source)
                if pages is not None:
                    pages.release(source)
                views[name] = part
            pair.append(target)
        fused.append((pair[0], pair[1]))
    return views, fused


def place_tensors(
    state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, pages: Any = None
) -> dict[str, torch.Tensor]:
    """Copy each tensor of ``state`` to ``device`` (floating ones in ``dtype``), emptying ``state`` as it goes.

    ``pages`` (a ``MappedPages``) gets each source tensor back once it is copied, so that the pages
    of a memory-mapped file do not stay resident beside the copies.
    """
    import torch

    placed = {}
    for name in list(state):
        source = state.pop(name)
        target = torch.empty(source.shape, dtype=dtype if source.is_floating_point() else source.dtype, device=device)
        target.copy_(source)
        if pages is not None:
            pages.release(source)
        placed[name] = target
    return placed


def _esm2_config(checkpoint: Path, data: Any) -> argparse.Namespace:
    """The model Namespace of a published ESM-2 checkpoint, or a UserError saying what is wrong."""
    import torch

    cfg = data.get("cfg") if isinstance(data, dict) else None
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, argparse.Namespace) or not isinstance(data.get("model"), dict):
        raise UserError(
            f"{checkpoint}: not an ESM-2 checkpoint in fair-esm's format (expected a dict with 'cfg' -> "
            "{'model': Namespace} and 'model' -> state dict); ESM-1 checkpoints are not supported"
        )
    missing = [field for field in _CFG_FIELDS if not hasattr(model_cfg, field)]
    if missing:
        raise UserError(f"{checkpoint}: the checkpoint's cfg lacks {', '.join(missing)}; is it an ESM-2 checkpoint?")
    if not all(isinstance(tensor, torch.Tensor) for tensor in data["model"].values()):
        raise UserError(f"{checkpoint}: the checkpoint's 'model' entry holds something other than tensors")
    return model_cfg


def _contact_regression(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The contact head's weights from the companion file, or zeros (with a warning) when it is missing."""
    from virnucpro.engines.safeload import load_allowlisted

    companion = contact_regression_path(checkpoint)
    if not companion.is_file():
        log.warning(
            "%s: the contact-regression companion %s is missing; fair-esm would refuse this checkpoint, "
            "embeddings do not need it (contact prediction is left unusable)",
            checkpoint,
            companion.name,
        )
        return {}
    data = load_allowlisted(companion, [argparse.Namespace], hint=_HINT)
    weights = data.get("model") if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"{companion}: not a fair-esm contact-regression file (no 'model' dict)")
    return {name: tensor for name, tensor in upgrade_state_dict(weights).items() if name.startswith(CONTACT_HEAD)}


def contact_regression_path(checkpoint: Path) -> Path:
    """Where fair-esm looks for a checkpoint's contact-regression companion: ``<stem>-contact-regression.pt`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "-contact-regression.pt")


def _check_state(checkpoint: Path, model: Any, state: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict whose keys or shapes do not match the model; fill a missing contact head with zeros."""
    import torch

    expected = model.state_dict()
    missing = sorted(name for name in expected if name not in state and not name.startswith(CONTACT_HEAD))
    unexpected = sorted(name for name in state if name not in expected)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} weight(s), e.g. {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
        raise UserError(
            f"{checkpoint}: the weights do not match the ESM-2 shape its cfg describes ({'; '.join(problems)})"
        )
    for name, reference in expected.items():
        if name not in state:
            state[name] = torch.zeros(reference.shape, dtype=torch.float16)
        elif not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != tuple(reference.shape):
            raise UserError(
                f"{checkpoint}: weight {name} has shape {tuple(state[name].shape)}, "
                f"expected {tuple(reference.shape)} for the ESM-2 shape its cfg describes"
            )

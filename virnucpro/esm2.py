"""ESM-2 protein embeddings from a fair-esm checkpoint, loaded without unpickling arbitrary objects.

The published checkpoint (``esm2_t36_3B_UR50D.pt``) is a ``torch.save``d dict: ``cfg`` ->
``{"model": argparse.Namespace(encoder_layers=..., ...)}`` and ``model`` -> a fp16 state dict whose
keys carry the prefixes ``encoder.sentence_encoder.`` and ``encoder.lm_head.``; beside it sits
``<name>-contact-regression.pt`` (``{"model": {"contact_head.regression.*": ...}}``). fair-esm's own
loader fails under torch>=2.6 and, made to work, unpickles anything; ``load_esm2`` reads the same
files with torch's weights-only unpickler that allows ``argparse.Namespace`` and nothing more.

The contact-regression companion is not needed for embeddings: when it is missing, fair-esm refuses
the checkpoint, ``load_esm2`` only logs a warning and leaves the (unused) contact head at zero.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.errors import UserError

if TYPE_CHECKING:
    import torch

    from virnucpro.embedded import Embedded

log = logging.getLogger(__name__)

MEAN_POSITIONS = 1024
"""The published vector is the mean of the representations at positions 1 .. min(1024, len)."""

_PREFIXES = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_CONTACT_HEAD = "contact_head."
_CFG_FIELDS = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")


def torch_load_allowlisted(path: Path, allowed: Iterable[Any], *, mmap: bool = False) -> Any:
    """``torch.load`` with the weights-only unpickler, allowing only ``allowed`` beyond plain tensors.

    A file that asks to unpickle anything else is refused with a UserError before any of it runs.
    Entries of ``allowed`` are classes or ``(class, "module.QualName")`` pairs.
    """
    import pickle

    import torch

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "mmap" not in str(error):
                    raise
                # an old (pre-zipfile) torch.save format cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_global(str(error))
        if refused is None:
            raise UserError(f"{path}: not a readable torch checkpoint ({_last_words(error)})") from None
        raise UserError(
            f"refusing to load {path}: it asks to unpickle {refused}, which is not an allowed type; "
            "model files may hold only weights (if you trust this file, re-save its weights as a state dict)"
        ) from None
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable torch checkpoint ({_last_words(error)})") from None


def _refused_global(message: str) -> str | None:
    """The name of what torch's weights-only unpickler refused to unpickle, as its message says."""
    for pattern in (r"GLOBAL (\S+?)[,\s]", r"unrecognized function (\S+)", r"but got (<[^>]+>)"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def _last_words(error: Exception) -> str:
    """The error's type and the gist of its message, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    gist = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {gist}"[:300]


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the published prefixes ``encoder.sentence_encoder.`` / ``encoder.`` from the keys."""
    return {_PREFIXES.sub("", name): tensor for name, tensor in state.items()}


class Esm2Embedder:
    """A loaded ESM-2 model that embeds proteins exactly as the published extraction does."""

    def __init__(self, model: Any, alphabet: Any, layer: int, toks_per_batch: int) -> None:
        self.model = model
        self.alphabet = alphabet
        self.layer = layer
        self.toks_per_batch = toks_per_batch
        self.batch_converter = alphabet.get_batch_converter()

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def embed(self, sequences: list[str]) -> Embedded:
        """Mean representation of ``layer`` over residues 1..min(1024, len), one row per sequence in input order."""
        import torch
        from esm.data import FastaBatchedDataset

        from virnucpro.embedded import Embedded

        for index, sequence in enumerate(sequences):
            if not sequence:
                raise UserError(f"protein sequence #{index + 1} is empty: ESM-2 cannot embed an empty protein")
        vectors = torch.empty(len(sequences), self.dim, dtype=torch.float32)
        dataset = FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
        batches = dataset.get_batch_indices(self.toks_per_batch, extra_toks_per_seq=1)
        with torch.inference_mode():
            for batch in batches:
                _, strs, tokens = self.batch_converter([dataset[i] for i in batch])
                out = self.model(tokens.to(self.device), repr_layers=[self.layer])
                representations = out["representations"][self.layer]
                for row, (index, sequence) in enumerate(zip(batch, strs)):
                    end = min(MEAN_POSITIONS, len(sequence))
                    vectors[index] = representations[row, 1 : end + 1].float().mean(0).cpu()
        return Embedded(vectors=vectors, tokens=sum(len(s) + 2 for s in sequences))


def load_esm2(
    checkpoint: Path,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    layer: int | None = None,
    toks_per_batch: int = 2048,
) -> Esm2Embedder:
    """Load a published-format ESM-2 checkpoint onto ``device`` (fp32 unless ``dtype``, last layer unless ``layer``)."""
    import torch
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    checkpoint = Path(checkpoint)
    data = torch_load_allowlisted(checkpoint, [argparse.Namespace], mmap=True)
    cfg = _esm2_config(checkpoint, data)
    state = upgrade_state_dict(data["model"])
    if not checkpoint.name.startswith("esm2"):
        log.warning(
            "%s: the file name does not start with 'esm2', so fair-esm would not read it as ESM-2; "
            "reading it as ESM-2 because its cfg describes one",
            checkpoint,
        )
    state.update(_contact_regression(checkpoint))

    alphabet = Alphabet.from_architecture("ESM-1b")
    with torch.device("meta"):
        model = ESM2(
            num_layers=cfg.encoder_layers,
            embed_dim=cfg.encoder_embed_dim,
            attention_heads=cfg.encoder_attention_heads,
            alphabet=alphabet,
            token_dropout=cfg.token_dropout,
        )
    _check_state(checkpoint, model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.embed_tokens.weight  # the published model ties these two
    model = model.to(device=device, dtype=dtype or torch.float32).eval()

    num_layers = cfg.encoder_layers
    if layer is None:
        layer = num_layers
    if not 0 <= layer <= num_layers:
        raise UserError(f"{checkpoint}: layer {layer} does not exist; this ESM-2 model has layers 0..{num_layers}")
    if toks_per_batch < 1:
        raise UserError(f"ESM-2 batch token budget must be positive, got {toks_per_batch}")
    return Esm2Embedder(model, alphabet, layer, toks_per_batch)


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
    companion = checkpoint.with_name(checkpoint.stem + "-contact-regression.pt")
    if not companion.is_file():
        log.warning(
            "%s: the contact-regression companion %s is missing; fair-esm would refuse this checkpoint, "
            "embeddings do not need it (contact prediction is left unusable)",
            checkpoint,
            companion.name,
        )
        return {}
    data = torch_load_allowlisted(companion, [argparse.Namespace])
    weights = data.get("model") if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"{companion}: not a fair-esm contact-regression file (no 'model' dict)")
    return {
        name: tensor for name, tensor in upgrade_state_dict(weights).items() if name.startswith(_CONTACT_HEAD)
    }


def _check_state(checkpoint: Path, model: Any, state: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict whose keys or shapes do not match the model; fill a missing contact head with zeros."""
    import torch

    expected = model.state_dict()
    missing = sorted(name for name in expected if name not in state and not name.startswith(_CONTACT_HEAD))
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
        elif tuple(state[name].shape) != tuple(reference.shape):
            raise UserError(
                f"{checkpoint}: weight {name} has shape {tuple(state[name].shape)}, "
                f"expected {tuple(reference.shape)} for the ESM-2 shape its cfg describes"
            )


def write_random_checkpoint(
    path: Path,
    *,
    num_layers: int = 2,
    embed_dim: int = 64,
    attention_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a small random-weight ESM-2 checkpoint and its contact-regression companion in the published layout."""
    import torch
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    path = Path(path)
    if not path.name.startswith("esm2"):
        raise ValueError(f"{path}: an ESM-2 checkpoint's name must start with 'esm2' (fair-esm reads the name)")
    generator = torch.Generator().manual_seed(seed)
    alphabet = Alphabet.from_architecture("ESM-1b")
    model = ESM2(num_layers, embed_dim, attention_heads, alphabet, token_dropout=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("rot_emb.inv_freq"):
            state[name] = tensor.clone()
        elif name == "embed_tokens.weight":
            state[name] = torch.randn(tensor.shape, generator=generator)
            state[name][alphabet.padding_idx] = 0.0
        elif name.endswith("layer_norm.weight") or name.endswith("layer_norm_after.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif tensor.dim() == 2:
            state[name] = torch.randn(tensor.shape, generator=generator) / tensor.shape[1] ** 0.5
        else:
            state[name] = 0.1 * torch.randn(tensor.shape, generator=generator)
    state = {name: tensor.half() for name, tensor in state.items()}
    state["lm_head.weight"] = state["embed_tokens.weight"]  # tied, one storage in the file as published

    encoder = {}
    regression = {}
    for name, stored in state.items():
        if name.startswith(_CONTACT_HEAD):
            regression[name] = stored
        elif name.startswith("lm_head."):
            encoder["encoder." + name] = stored
        else:
            encoder["encoder.sentence_encoder." + name] = stored
    cfg = argparse.Namespace(
        _name="esm2",
        arch=f"esm2_t{num_layers}_{embed_dim}",
        encoder_layers=num_layers,
        encoder_embed_dim=embed_dim,
        encoder_ffn_embed_dim=4 * embed_dim,
        encoder_attention_heads=attention_heads,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_fn="gelu",
        max_positions=1024,
        token_dropout=True,
        embed_scale=1.0,
        final_bias=True,
        untie_weights_roberta=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg}, "model": encoder}, path)
    companion = path.with_name(path.stem + "-contact-regression.pt")
    torch.save({"model": regression}, companion)
    return path

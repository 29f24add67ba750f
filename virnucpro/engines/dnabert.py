"""DNABERT-S nucleotide embeddings, from the published snapshot folder, with a native encoder.

The published tool runs ``zhihan1996/DNABERT-S`` through ``trust_remote_code`` one sequence at a
time and takes the mean of the last hidden state over all tokens, ``[CLS]`` and ``[SEP]`` included.
Here the same encoder (DNABERT-2 architecture, see docs/dnabert-s-format.md) is written in plain
PyTorch, reads the snapshot's own files (never its code), and runs padded batches whose padding is
masked out of the attention and of the mean, so that every vector equals the one-at-a-time one.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.errors import UserError

if TYPE_CHECKING:
    import tokenizers
    import torch

    from virnucpro.engines.dnabert_model import DnabertEncoder
    from virnucpro.engines.embedded import Embedded

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
"""The published vocabulary starts with these, ids 0 to 4."""

_PREFIX = "bert."
_UNUSED = ("cls.", "pooler.")
_FIX = (
    "put the published zhihan1996/DNABERT-S files there: 'virnucpro models download --dest DIR' "
    "writes them to DIR/DNABERT-S"
)


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi slope per head: 2^(-8h/n) for h = 1..n when n is a power of two; otherwise those of
    the largest power of two p below n, then every other slope for 2p, until there are n."""
    if n_heads < 1:
        raise ValueError(f"need at least one attention head, got {n_heads}")
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    if p == n_heads:
        return slopes
    return slopes + alibi_slopes(2 * p)[0::2][: n_heads - p]


@dataclass(frozen=True)
class DnabertConfig:
    """The config.json values that shape the computation (the others do not change it)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    type_vocab_size: int
    layer_norm_eps: float


def read_config(path: Path) -> DnabertConfig:
    """Read a snapshot's config.json; ``auto_map`` and the rest are ignored, never run."""
    return config_from_dict(_read_json(path), path)


def config_from_dict(data: dict[str, Any], path: Path) -> DnabertConfig:
    """The DnabertConfig of a config.json's contents; ``path`` names the file in errors."""
    values: dict[str, Any] = {}
    for name, kind in (
        ("vocab_size", int),
        ("hidden_size", int),
        ("num_hidden_layers", int),
        ("num_attention_heads", int),
        ("intermediate_size", int),
        ("type_vocab_size", int),
        ("layer_norm_eps", float),
    ):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"{path}: key '{name}' is missing or not a positive number; {_FIX}")
        if kind is int and value != int(value):
            raise UserError(f"{path}: key '{name}' must be a whole number, found {value}; {_FIX}")
        values[name] = kind(value)
    config = DnabertConfig(**values)
    if config.hidden_size % config.num_attention_heads:
        raise UserError(
            f"{path}: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {config.num_attention_heads}; {_FIX}"
        )
    return config


def select_tensors(
    raw: dict[str, Any], expected: dict[str, tuple[int, ...]], source: Path
) -> dict[str, Any]:
    """The tensors of ``expected`` (published names) from a checkpoint's ``raw`` tensors.

    Names may carry a ``bert.`` prefix; the MLM head (``cls.*``) and the pooler are left out.
    A missing or mis-shaped tensor raises a UserError naming ``source`` and the tensor.
    """
    found = {}
    for name, tensor in raw.items():
        bare = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if not bare.startswith(_UNUSED):
            found[bare] = (name, tensor)
    selected = {}
    for name, shape in expected.items():
        if name not in found:
            raise UserError(
                f"{source}: tensor '{name}' (or '{_PREFIX}{name}') is missing; "
                f"the file is not a DNABERT-S checkpoint matching config.json; {_FIX}"
            )
        stored_name, tensor = found[name]
        if tuple(tensor.shape) != shape:
            raise UserError(
                f"{source}: tensor '{stored_name}' has shape {list(tensor.shape)}, config.json "
                f"requires {list(shape)}; the weights and config.json do not belong together; {_FIX}"
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
        raise UserError(f"DNABERT-S snapshot folder not found: {snapshot_dir}; {_FIX}")
    config = read_config(_required(snapshot_dir, CONFIG_FILE))
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
        raise UserError(f"{directory}: {name} is missing (looked for {path}); {_FIX}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot be read as JSON ({error}); {_FIX}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; {_FIX}")
    return data


def _read_tokenizer(path: Path, config: DnabertConfig) -> tokenizers.Tokenizer:
    """The snapshot's tokenizer, checked to add [CLS]/[SEP] and to fit the embedding table."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception on a bad file
        raise UserError(f"{path}: not a tokenizer file the tokenizers library can read ({error}); {_FIX}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    ids = tokenizer.encode("A").ids
    if cls is None or sep is None or ids[0] != cls or ids[-1] != sep:
        raise UserError(f"{path}: the tokenizer does not wrap sequences in [CLS] ... [SEP]; {_FIX}")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(
            f"{path}: {tokenizer.get_vocab_size()} tokens, more than config.json's vocab_size "
            f"{config.vocab_size}; the tokenizer and the weights do not belong together; {_FIX}"
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
            raise UserError(f"{safetensors_path}: not a readable safetensors file ({error}); {_FIX}") from None
    if bin_path.is_file():
        from virnucpro.engines.safeload import load_state_dict

        return bin_path, load_state_dict(bin_path, hint=_FIX)
    raise UserError(f"{directory}: no weights, neither {SAFETENSORS_FILE} nor {BIN_FILE}; {_FIX}")


# --- small random-weight snapshots in the published layout (tests, demo) ---

_RANDOM_VOCAB_SIZE = 512
_PUBLISHED_CONFIG: dict[str, Any] = {
    "_name_or_path": "zhihan1996/DNABERT-2-117M",
    "alibi_starting_size": 512,
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_bert.BertConfig",
        "AutoModel": "bert_layers.BertModel",
        "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
        "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
    },
    "classifier_dropout": None,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "torch_dtype": "float32",
    "transformers_version": "4.28.0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 4096,
}
_TOKENIZER_CONFIG = {
    "clean_up_tokenization_spaces": True,
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": "[UNK]",
}
_SPECIAL_TOKENS_MAP = {
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "unk_token": "[UNK]",
}
WEIGHT_FORMATS = {"safetensors": SAFETENSORS_FILE, "bin": BIN_FILE}


def write_random_snapshot(
    directory: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    bert_prefix: bool = False,
    formats: Sequence[str] = ("safetensors",),
) -> Path:
    """Write a small random-weight DNABERT-S snapshot in the published layout; return ``directory``.

    ``formats``: any of ``"safetensors"`` (model.safetensors) and ``"bin"`` (pytorch_model.bin).
    ``bert_prefix``: tensor names under ``bert.`` with an MLM head (as DNABERT-2-117M publishes
    them) instead of bare names with a pooler (as DNABERT-S does). The same seed gives the same
    encoder tensors whatever the layout and format.
    """
    unknown = set(formats) - set(WEIGHT_FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats must be taken from {sorted(WEIGHT_FORMATS)}, got {list(formats)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _random_tokenizer_json(seed)
    config = dict(
        _PUBLISHED_CONFIG,
        architectures=["BertForMaskedLM" if bert_prefix else "BertModel"],
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        vocab_size=_RANDOM_VOCAB_SIZE,
    )
    state = _random_state(config_from_dict(config, directory / CONFIG_FILE), seed, bert_prefix)
    _write_json(directory / CONFIG_FILE, config)
    (directory / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", _TOKENIZER_CONFIG)
    _write_json(directory / "special_tokens_map.json", _SPECIAL_TOKENS_MAP)
    if "safetensors" in formats:
        from safetensors.torch import save_file

        save_file(state, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    if "bin" in formats:
        import torch

        torch.save(state, directory / BIN_FILE)
    return directory


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _random_tokenizer_json(seed: int) -> str:
    """A BPE tokenizer like the published one, its merges learnt from random DNA drawn with ``seed``."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from tokenizers.trainers import BpeTrainer

    rng = random.Random(seed)
    corpus = ["".join(rng.choices("ACGT", k=1000)) for _ in range(200)]
    tokenizer = Tokenizer(BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    trainer = BpeTrainer(
        vocab_size=_RANDOM_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list("ACGTN"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", SPECIAL_TOKENS.index("[CLS]")), ("[SEP]", SPECIAL_TOKENS.index("[SEP]"))],
    )
    data = json.loads(tokenizer.to_str())
    # the published file predates the list form of merges: "A T", not ["A", "T"]
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _random_state(config: DnabertConfig, seed: int, bert_prefix: bool) -> dict[str, torch.Tensor]:
    """Random tensors under the published names: encoder first, then the unused heads."""
    import torch

    from virnucpro.engines.dnabert_model import expected_shapes

    generator = torch.Generator().manual_seed(seed)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("LayerNorm.weight", "layernorm.weight")):
            return 1.0 + 0.1 * noise
        if name.endswith(("LayerNorm.bias", "layernorm.bias")):
            return 0.1 * noise
        if name.endswith(".bias") or name.startswith("embeddings."):
            return 0.02 * noise
        return noise / math.sqrt(shape[-1])

    state = {name: draw(name, shape) for name, shape in expected_shapes(config).items()}
    hidden = config.hidden_size
    if not bert_prefix:
        state["pooler.dense.weight"] = draw("pooler.dense.weight", (hidden, hidden))
        state["pooler.dense.bias"] = draw("pooler.dense.bias", (hidden,))
        return state
    state = {_PREFIX + name: tensor for name, tensor in state.items()}
    for name, shape in (
        ("cls.predictions.bias", (config.vocab_size,)),
        ("cls.predictions.transform.dense.weight", (hidden, hidden)),
        ("cls.predictions.transform.dense.bias", (hidden,)),
        ("cls.predictions.transform.LayerNorm.weight", (hidden,)),
        ("cls.predictions.transform.LayerNorm.bias", (hidden,)),
        ("cls.predictions.decoder.bias", (config.vocab_size,)),
    ):
        state[name] = draw(name, shape)
    state["cls.predictions.decoder.weight"] = state[_PREFIX + "embeddings.word_embeddings.weight"].clone()
    return state

"""Small random-weight models written in exactly the published file formats, for tests, benchmarks and the demo.

The engines only read models; everything that writes one lives here: an ESM-2 checkpoint with its
contact-regression companion (``write_random_checkpoint``, ``save_published_checkpoint``), a DNABERT-S
snapshot folder (``write_random_snapshot``), a classifier pickled as the published ``.pth``
(``write_published_classifier``), and all four together (``make_test_models``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.atomic import atomic_path, write_text
from virnucpro.engines.dnabert_config import (
    BERT_PREFIX,
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHT_FORMATS,
    DnabertConfig,
    config_from_dict,
)
from virnucpro.engines.download import MODEL_PATHS, MODELS_JSON
from virnucpro.prep.chunk import EXPECTED_LENGTHS

if TYPE_CHECKING:
    import torch

DNABERT_HIDDEN = 64
ESM_DIM = 64


def make_test_models(output_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write an ESM-2 checkpoint, a DNABERT-S snapshot and both classifiers; return (and record) their paths."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "esm2": write_random_checkpoint(
            output_dir / "esm2_t2_64_test.pt", num_layers=2, embed_dim=ESM_DIM, attention_heads=4, seed=seed
        ),
        "dnabert_s": write_random_snapshot(
            output_dir / MODEL_PATHS["dnabert_s"], hidden_size=DNABERT_HIDDEN, num_layers=2, num_heads=4, seed=seed
        ),
    }
    for length in EXPECTED_LENGTHS:
        paths[f"classifier_{length}"] = write_published_classifier(
            output_dir / MODEL_PATHS[f"classifier_{length}"], input_dim=DNABERT_HIDDEN + ESM_DIM, seed=seed + length
        )
    write_text(output_dir / MODELS_JSON, json.dumps({name: str(path) for name, path in paths.items()}, indent=2) + "\n")
    return paths


# --- ESM-2 ---


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

    from virnucpro.engines.esm2 import ALPHABET, ROTARY_FREQUENCIES

    generator = torch.Generator().manual_seed(seed)
    alphabet = Alphabet.from_architecture(ALPHABET)
    model = ESM2(num_layers, embed_dim, attention_heads, alphabet, token_dropout=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(ROTARY_FREQUENCIES):
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
    return save_published_checkpoint(
        path, state, num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads
    )


def save_published_checkpoint(
    path: Path, state: dict[str, torch.Tensor], *, num_layers: int, embed_dim: int, attention_heads: int
) -> Path:
    """Save an ESM2 state dict (our bare names, fp16) as fair-esm publishes it: prefixed keys, a cfg Namespace,
    ``lm_head.weight`` tied to ``embed_tokens.weight`` (one storage), and the contact-regression companion.
    Each file is written atomically, the companion first: a checkpoint that exists has its companion."""
    import torch

    from virnucpro.engines.esm2 import CONTACT_HEAD, contact_regression_path

    path = Path(path)
    if not path.name.startswith("esm2"):
        raise ValueError(f"{path}: an ESM-2 checkpoint's name must start with 'esm2' (fair-esm reads the name)")
    state = dict(state)
    state["lm_head.weight"] = state["embed_tokens.weight"]
    encoder = {}
    regression = {}
    for name, stored in state.items():
        if name.startswith(CONTACT_HEAD):
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
    with atomic_path(contact_regression_path(path)) as temporary:
        torch.save({"model": regression}, temporary)
    with atomic_path(path) as temporary:
        torch.save({"cfg": {"model": cfg}, "model": encoder}, temporary)
    return path


# --- DNABERT-S ---

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
    write_text(directory / TOKENIZER_FILE, tokenizer_json)
    _write_json(directory / TOKENIZER_CONFIG_FILE, _TOKENIZER_CONFIG)
    _write_json(directory / SPECIAL_TOKENS_MAP_FILE, _SPECIAL_TOKENS_MAP)
    if "safetensors" in formats:
        from safetensors.torch import save_file

        with atomic_path(directory / SAFETENSORS_FILE) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
    if "bin" in formats:
        import torch

        with atomic_path(directory / BIN_FILE) as temporary:
            torch.save(state, temporary)
    return directory


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


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
    state = {BERT_PREFIX + name: tensor for name, tensor in state.items()}
    for name, shape in (
        ("cls.predictions.bias", (config.vocab_size,)),
        ("cls.predictions.transform.dense.weight", (hidden, hidden)),
        ("cls.predictions.transform.dense.bias", (hidden,)),
        ("cls.predictions.transform.LayerNorm.weight", (hidden,)),
        ("cls.predictions.transform.LayerNorm.bias", (hidden,)),
        ("cls.predictions.decoder.bias", (config.vocab_size,)),
    ):
        state[name] = draw(name, shape)
    state["cls.predictions.decoder.weight"] = state[BERT_PREFIX + "embeddings.word_embeddings.weight"].clone()
    return state


# --- the classifier ---


def write_published_classifier(path: Path, input_dim: int, hidden_dim: int = 512, seed: int = 0) -> Path:
    """Write a random classifier as the published ``.pth`` is: ``torch.save(model)`` of ``__main__.MLPClassifier``."""
    import torch

    from virnucpro.classify.classifier import mlp_class

    base = mlp_class()
    published = type("MLPClassifier", (base,), {"__module__": "__main__", "__qualname__": "MLPClassifier"})
    generator = torch.Generator().manual_seed(seed)
    model = published(input_dim, hidden_dim, 2)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == "bn1.running_var":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name == "bn1.weight":
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name == "bn1.num_batches_tracked":
                tensor.fill_(1000)
            elif name.endswith("weight"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[1] ** 0.5)
            else:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
    model.eval()

    main = sys.modules["__main__"]
    absent = object()
    before = getattr(main, "MLPClassifier", absent)
    main.MLPClassifier = published
    try:
        path = Path(path)
        with atomic_path(path) as temporary:
            torch.save(model, temporary)
    finally:
        if before is absent:
            del main.MLPClassifier
        else:
            main.MLPClassifier = before
    return path

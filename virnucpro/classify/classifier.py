"""The VirNucPro MLP classifier: safe loading of the published pickles, conversion, scoring.

The published ``300_model.pth`` / ``500_model.pth`` are whole modules pickled with
``torch.save(model)`` from a script, so they name the class ``__main__.MLPClassifier``. Reading them
with plain ``torch.load`` would run whatever the pickle asks for. ``load_classifier`` reads them with
torch's weights-only unpickler, which may build only the few torch.nn classes such a file needs and
our own ``MLPClassifier`` standing in for ``__main__.MLPClassifier``; it then copies the tensors into
a fresh module. State-dict files and ``.safetensors`` files (see ``convert_classifier``) work too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from virnucpro.atomic import atomic_path
from virnucpro.engines.download import DOWNLOAD_COMMAND, MODEL_PATHS
from virnucpro.errors import UserError

if TYPE_CHECKING:
    import torch

BATCH = 4096
_KEYS = (
    "hidden_layer.weight",
    "hidden_layer.bias",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "output_layer.weight",
    "output_layer.bias",
)
_OPTIONAL_KEYS = ("bn1.num_batches_tracked",)
_MLP: type | None = None
_HINT = (
    f"'{DOWNLOAD_COMMAND}' fetches the published DIR/{MODEL_PATHS['classifier_300']} and "
    f"DIR/{MODEL_PATHS['classifier_500']}; use the one that matches the expected read length"
)


def mlp_class() -> type:
    """The published architecture as a torch module class (built lazily to keep imports cheap)."""
    global _MLP
    if _MLP is None:
        import torch
        from torch import nn

        class MLPClassifier(nn.Module):
            """Linear -> BatchNorm1d -> ReLU -> Dropout(0.5) -> Linear, as published."""

            def __init__(self, input_dim: int, hidden_dim: int = 512, num_class: int = 2) -> None:
                super().__init__()
                self.hidden_layer = nn.Linear(input_dim, hidden_dim)
                self.bn1 = nn.BatchNorm1d(hidden_dim)
                self.output_layer = nn.Linear(hidden_dim, num_class)
                self.dropout = nn.Dropout(0.5)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = torch.relu(self.bn1(self.hidden_layer(x)))
                return self.output_layer(self.dropout(x))

        MLPClassifier.__module__ = __name__
        _MLP = MLPClassifier
    return _MLP


def load_classifier(path: Path) -> torch.nn.Module:
    """Read a published ``.pth`` (whole module or state dict) or a ``.safetensors`` classifier; eval mode, CPU."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"classifier file {what}: {path}; {_HINT}")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_pickle(path)
    return _build(path, state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a published whole-module pickle or of a state-dict file, read without running code."""
    import torch
    from torch import nn

    from virnucpro.engines.safeload import load_allowlisted

    mlp = mlp_class()
    allowed = [
        nn.Linear,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.ReLU,
        (mlp, "__main__.MLPClassifier"),
    ]
    data = load_allowlisted(path, allowed)
    if isinstance(data, mlp):
        return dict(data.state_dict())
    if isinstance(data, dict) and all(isinstance(value, torch.Tensor) for value in data.values()):
        return dict(data)
    raise UserError(
        f"{path}: not a VirNucPro classifier (found a {type(data).__name__}, expected the pickled "
        "MLPClassifier or its state dict)"
    )


def _build(path: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh eval-mode MLPClassifier holding ``state``, its widths taken from the weights."""
    import torch

    missing = [key for key in _KEYS if key not in state]
    unexpected = [key for key in state if key not in _KEYS + _OPTIONAL_KEYS]
    if missing or unexpected:
        detail = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(unexpected)}"
        raise UserError(f"{path}: not a VirNucPro classifier ({detail})")
    hidden_dim, input_dim = state["hidden_layer.weight"].shape
    num_class = state["output_layer.weight"].shape[0]
    model = mlp_class()(input_dim, hidden_dim, num_class)
    state = dict(state)
    state.setdefault("bn1.num_batches_tracked", torch.tensor(0))
    try:
        model.load_state_dict({key: v.float() if v.is_floating_point() else v for key, v in state.items()})
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"{path}: the classifier's weights do not fit together ({first})") from None
    return model.eval()


def classify(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities [n, 2] float32 (column 0 others, column 1 virus), in batches of ``BATCH`` rows."""
    import torch

    width = model.hidden_layer.in_features
    if features.dim() != 2 or features.shape[1] != width:
        raise UserError(
            f"the classifier expects {width} features per frame but got {tuple(features.shape)}; "
            "do the embedding models match the classifier?"
        )
    model.eval()
    out = torch.empty(features.shape[0], model.output_layer.out_features, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, features.shape[0], BATCH):
            batch = features[start : start + BATCH].to(torch.float32)
            out[start : start + BATCH] = torch.softmax(model(batch), dim=1)
    return out


def convert_classifier(src: Path, dst: Path) -> None:
    """Write the classifier at ``src`` as ``dst`` in safetensors (weights plus widths in the metadata), atomically."""
    from safetensors.torch import save_file

    model = load_classifier(src)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "architecture": "VirNucPro MLPClassifier",
        "dims": json.dumps(
            {
                "input_dim": model.hidden_layer.in_features,
                "hidden_dim": model.hidden_layer.out_features,
                "num_class": model.output_layer.out_features,
            }
        ),
        "source": Path(src).name,
    }
    with atomic_path(Path(dst)) as temporary:
        save_file(state, str(temporary), metadata=metadata)

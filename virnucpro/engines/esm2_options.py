"""Which ESM-2 engine paths run: the ``esm2_engine`` setting (config key, ``virnucpro serve --esm2-engine``).

``default`` is the engine as it was before these paths existed (padded batches as fair-esm makes them,
PyTorch's fused attention, the mean taken from the padded representations in fp32). Any other value
names the techniques to turn on, comma-separated, or ``all`` of them:

- ``fused-qkv``: one q/k/v projection on the concatenated weights (the weights are always stored
  concatenated at load, with the three projections as views of that storage: no extra copy);
- ``packed``: batches filled to the token budget with the proteins back to back, no padding;
  attention on PyTorch's variable-length kernel where there is one (CUDA, bf16/fp16), else on padded
  copies of each batch made for the attention alone (the CPU, fp32);
- ``device-mean``: the padded path's mean reduced in fp32 straight from the model's dtype, without an
  fp32 copy of the padded representations (the packed path always averages on the device this way);
- ``compile``: ``torch.compile`` of the layer's two parts around the attention (regional: one graph
  for all layers, compiled with dynamic shapes so that batch shapes do not recompile);
- ``cuda-graphs``: with ``packed``, the batches bucketed (tokens, proteins and the longest protein
  padded up to powers of two) and, on CUDA, one CUDA graph of the whole forward per bucket (on the
  CPU only the bucketing applies);
- ``overlap``: the next batch tokenized (into pinned memory) by a background thread while the device
  computes, copies to the device and the vectors back to the host on a side stream.

The vectors do not depend on the choice beyond float rounding (in fp32: within 1e-6 relative L2,
tests/test_esm2_paths.py). This module imports nothing heavy: the configuration and the command line
check the setting with it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from virnucpro.errors import UserError

DEFAULT = "default"
ALL = "all"


@dataclass(frozen=True)
class EngineOptions:
    """The ESM-2 engine techniques turned on; all off is today's engine (``default``)."""

    fused_qkv: bool = False
    packed: bool = False
    device_mean: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    overlap: bool = False

    @property
    def is_default(self) -> bool:
        return self == EngineOptions()

    @property
    def bucketed(self) -> bool:
        """Whether packed batches are padded up to fixed shapes (what CUDA graphs are recorded for)."""
        return self.packed and self.cuda_graphs

    def __str__(self) -> str:
        on = [_name(field.name) for field in fields(self) if getattr(self, field.name)]
        return ",".join(on) if on else DEFAULT


TECHNIQUES = tuple(field.name.replace("_", "-") for field in fields(EngineOptions))
"""The technique names of the setting, in the order of EngineOptions' fields."""


def _name(field_name: str) -> str:
    return field_name.replace("_", "-")


def parse_engine(text: str | EngineOptions | None) -> EngineOptions:
    """``default``, ``all`` or comma-separated technique names (see the module doc) as EngineOptions;
    a UserError naming what is wrong otherwise."""
    if isinstance(text, EngineOptions):
        return text
    text = (text or DEFAULT).strip().lower()
    if text == DEFAULT:
        return EngineOptions()
    if text == ALL:
        return EngineOptions(**{field.name: True for field in fields(EngineOptions)})
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TECHNIQUES]
    if unknown or not names:
        raise UserError(
            f"unknown ESM-2 engine setting '{text}': use {DEFAULT}, {ALL}, or some of {', '.join(TECHNIQUES)} "
            "separated by commas"
        )
    options = EngineOptions(**{name.replace("-", "_"): True for name in names})
    if options.cuda_graphs and not options.packed:
        raise UserError(f"ESM-2 engine setting '{text}': cuda-graphs needs packed (graphs are made per packed bucket)")
    return options

"""Architecture adapters, chosen from config.json's `model_type`.

Each adapter validates config.json, plans once per layer which tensors it reads and the shape
each must have (`LayerPlan`), and slices them into heads (see `svd_probe.adapters.base`). Add a
layout by writing a class with `model_types` and listing it in `_ADAPTERS`.
"""

from __future__ import annotations

from svd_probe.adapters.base import (
    AdapterClass,
    ArchitectureAdapter,
    AttentionFactors,
    LayerPlan,
    ModelDims,
    TensorSpec,
)
from svd_probe.adapters.bert import BertAdapter
from svd_probe.adapters.common import decoder_config
from svd_probe.adapters.gpt2 import GPT2Adapter
from svd_probe.adapters.llama import LlamaAdapter
from svd_probe.adapters.mla import MLAAdapter
from svd_probe.adapters.svd_probe_train import SvdProbeTrainAdapter
from svd_probe.errors import UnsupportedModelError

_ADAPTERS: list[AdapterClass] = [MLAAdapter, LlamaAdapter, BertAdapter, GPT2Adapter, SvdProbeTrainAdapter]


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def supported_model_types() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


def adapter_for(config: dict, tensor_names: set[str] | None = None) -> ArchitectureAdapter:
    """The adapter for this checkpoint, or `UnsupportedModelError` listing what is supported.

    Args:
        config: config.json as parsed (a multimodal wrapper resolves to its `text_config`).
        tensor_names: every tensor name in the checkpoint, when known: the adapter finds the
            layer prefix and the layers present in them (an MTP layer counts only when present).
    Returns:
        The adapter, its config already validated (`BadConfigError` names a bad field).
    Example:
        >>> ad = adapter_for(source.config, source.tensor_names)
        >>> plan = ad.plan(0, {"VO"}, fold_norms=True)
    """
    model_type = config.get("model_type")
    for cfg in (config, decoder_config(config)):
        for cls in _ADAPTERS:
            if cfg.get("model_type") in cls.model_types:
                return cls(cfg, tensor_names)
    inner = decoder_config(config).get("model_type")
    nested = f" (its text_config has model_type {_show(inner)})" if inner != model_type else ""
    raise UnsupportedModelError(
        f"no adapter reads model_type {_show(model_type)}{nested}",
        "Supported model types: " + ", ".join(supported_model_types()) + ".",
    )


__all__ = [
    "ArchitectureAdapter",
    "AttentionFactors",
    "LayerPlan",
    "ModelDims",
    "TensorSpec",
    "adapter_for",
    "supported_model_types",
]

"""Architecture adapters, chosen from config.json's `model_type`.

Each adapter declares which tensors a layer needs and how they slice into heads
(see `svd_probe.adapters.base`). Add a layout by writing a class with `model_types` and
listing it in `_ADAPTERS`.
"""

from __future__ import annotations

from svd_probe.adapters.base import ArchitectureAdapter, AttentionFactors, ModelDims
from svd_probe.adapters.bert import BertAdapter
from svd_probe.adapters.common import decoder_config
from svd_probe.adapters.gpt2 import GPT2Adapter
from svd_probe.adapters.llama import LlamaAdapter
from svd_probe.adapters.mla import MLAAdapter
from svd_probe.adapters.svd_probe_train import SvdProbeTrainAdapter
from svd_probe.errors import UnsupportedModelError

_ADAPTERS: list[type] = [MLAAdapter, LlamaAdapter, BertAdapter, GPT2Adapter, SvdProbeTrainAdapter]


def supported_model_types() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


def adapter_for(config: dict, tensor_names: set[str] | None = None) -> ArchitectureAdapter:
    """The adapter for this checkpoint, or `UnsupportedModelError` listing what is supported."""
    model_type = config.get("model_type")
    for cfg in (config, decoder_config(config)):
        for cls in _ADAPTERS:
            if cfg.get("model_type") in cls.model_types:
                return cls(cfg, tensor_names)
    inner = decoder_config(config).get("model_type")
    nested = f" (its text_config has model_type {inner!r})" if inner != model_type else ""
    raise UnsupportedModelError(
        f"no adapter reads model_type {model_type!r}{nested}",
        "Supported model types: " + ", ".join(supported_model_types()) + ".",
    )


__all__ = ["ArchitectureAdapter", "AttentionFactors", "ModelDims", "adapter_for", "supported_model_types"]

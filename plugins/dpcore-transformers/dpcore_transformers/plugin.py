"""The entry point dpcore loads (group ``dpcore``, name ``transformers``)."""

from __future__ import annotations

import importlib

from dpcore.hookspecs import Register, hookimpl

from .samplers import Conv1DGradSampler, HFRMSNormGradSampler, ViTEmbeddingsGradSampler

#: RMSNorm classes computing ``weight * (x / rms(x))`` (module, class name)
RMS_NORMS = [
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
]


@hookimpl
def dpcore_register_layer_grad_samplers(register: Register) -> None:
    from transformers.pytorch_utils import Conv1D

    register(
        Conv1D,
        Conv1DGradSampler(),
        description="GPT-2's transposed linear layer; ghost norms and book-keeping taps",
    )
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    register(
        ViTEmbeddings,
        ViTEmbeddingsGradSampler(),
        description="ViT class token, position and mask embeddings (output-gradient slices)",
    )
    rms = HFRMSNormGradSampler()
    for module_name, class_name in RMS_NORMS:
        try:
            layer_type = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # an older/newer transformers without it
            continue
        register(layer_type, rms, description=f"{class_name} (weight * x / rms(x))")

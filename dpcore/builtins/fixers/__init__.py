"""Built-in module fixers used by ModuleValidator.fix."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_module_fixers(register: Register) -> None:
    from .layers import GRUFixer, LSTMFixer, MultiheadAttentionFixer, RNNFixer
    from .norms import BatchNormFixer, InstanceNormFixer, TrainableBuffersCheck

    register("batchnorm", BatchNormFixer(), description="BatchNorm/SyncBatchNorm -> GroupNorm")
    register(
        "instancenorm", InstanceNormFixer(), description="InstanceNorm running statistics -> off"
    )
    register("lstm", LSTMFixer(), description="nn.LSTM -> dpcore.layers.DPLSTM (weights copied)")
    register("gru", GRUFixer(), description="nn.GRU -> dpcore.layers.DPGRU (weights copied)")
    register("rnn", RNNFixer(), description="nn.RNN -> dpcore.layers.DPRNN (weights copied)")
    register(
        "multihead_attention",
        MultiheadAttentionFixer(),
        description="nn.MultiheadAttention -> dpcore.layers.DPMultiheadAttention",
    )
    register(
        "trainable_buffers",
        TrainableBuffersCheck(),
        description="flags trainable layers that keep buffers (no automatic fix)",
    )

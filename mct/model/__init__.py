"""The MiniCPM model (layer 3): the decoder (`decoder`: MiniCPM and ParamsModel), attention dispatch and the KV
cache, RoPE, MoE, MTP, FP8, BitCPM quantisation, the fused loss, pre-training's objective and FLOP counts.
Imports `mct.config`, `mct.parallel`, `mct.errors` and `pallas_kernels`; never data, training or run code.
"""

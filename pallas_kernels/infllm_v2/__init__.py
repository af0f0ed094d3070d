"""InfLLM v2 trainable sparse attention: block selection and block-sparse attention (MiniCPM4 report section 2.1).

Modules: `config` (the settings record, no JAX), `selection`, `api` (the dispatch over kernels), `decode`,
`xla_sparse`, `pallas_gpu`, `pallas_tpu`, `reference`. Import from them directly: this package imports nothing,
so the model's config can read the settings record without loading a kernel.
"""

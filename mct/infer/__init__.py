"""Inference (layer 6): KV-cache decoding with sampling (`decoding`), speculative and MTP-speculative decoding,
and generation from a run's checkpoint (`generate`). Imports `mct.run` and the layers below, and
`data_pipelines` (tokenizer, chat format); not `mct.export`, `mct.launch` or anything above.
"""

"""Inference (layer 6): the one decode loop and its stop rule (`loop`), KV-cache decoding with sampling
(`decoding`), speculative and MTP-speculative decoding (strategies of the same loop), and generation from a
run's checkpoint (`generate`). Imports `mct.run` and the layers below, and `data_pipelines` (tokenizer, chat
format); not `mct.export`, `mct.launch` or anything above.
"""

"""Checkpoints in and out (layer 6): HF layouts (`hf_layout`), safetensors export (`hf_export`) and import
(`hf_import`), one GGUF file for llama.cpp (`gguf_export`, its tokenizer keys in `gguf_vocab`). Imports `mct.run`
and the layers below, and `data_pipelines`; not `mct.infer`, `mct.launch` or anything above. `python -m mct.export`
runs `mct.cli.export`.
"""

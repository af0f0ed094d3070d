"""Entry points (layer 9, the top): one module per command (`train`, `sft`, `dpo`, `rl`, `export`, `import_hf`,
`generate`, `aot`, `launch`, `upcycle`, `tunnel`, `eval`) with its flags, logging and signals, and `common` (platform
choice, `--config` -> Config once, `mct.errors` -> `error: ...` and exit 2). May import anything in mct;
nothing in the library imports it.
"""

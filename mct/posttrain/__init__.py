"""Post-training (layer 7): SFT chat data and runs, preference pairs and DPO, chunk-wise rollout, the GRPO/DAPO
objective, verifiable rewards and RL runs. Imports `mct.infer`, `mct.run` and the layers below, and
`data_pipelines` (the chat format lives there); not `mct.tunnel` or `mct.cli`.
"""

"""Direct preference optimisation (Rafailov et al. 2023; MiniCPM-DPO, MiniCPM paper section 7):
python -m mct.dpo --config experiments/configs/tiny_cpu_dpo.py --config.workdir W --config.init_from=SFT_WORKDIR

loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))) per pair, plus
dpo.sft_weight x the chosen answer's mean token loss (OpenBMB: beta 0.1, weight 0.5). The reference is a
frozen copy of init_from's params; its log-probs are computed once per batch, before the step, and ride in
the batch (`ref_logp` [rows, 2]). Everything else is a pre-training run (mct.run.pretrain: resume, hooks,
checkpoints, SIGTERM save); eval_loss is the held-out chosen answers' token loss.
"""

from mct.cli.train import entry_for
from mct.config.posttrain import DPORunConfig
from mct.posttrain.dpo import train_dpo

entry = entry_for(train_dpo, DPORunConfig)


if __name__ == "__main__":
    entry()

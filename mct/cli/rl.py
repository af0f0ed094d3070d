"""RL entry point with chunk-wise rollout (MiniCPM4 report section 3.2):
python -m mct.rl --config experiments/configs/tiny_cpu_rl.py --config.init_from=SFT_WORKDIR

Every step: rl.prompts_per_step new prompts enter as groups of rl.group_size trajectories, merged with the
trajectories carried over in the replay buffer; one chunk (mct.posttrain.rollout) is decoded with the current params;
finished trajectories get their reward; every group whose G trajectories are all finished leaves the buffer,
gets group-normalised advantages, is dropped when uniform (dynamic sampling) and trains in mini-batches of
train.batch_size rows through `mct.train.trainer.build`'s step with the GRPO objective (mct/posttrain/grpo.py). The
reference policy is the params of the last multiple of rl.ref_refresh_steps. The lr is optimizer.lr under the
schedule, as in every run (an RL config makes it constant: mct.config.posttrain.RLRunConfig).

The run is every run's shell (mct.run.pretrain: lock, resume, the Trainer's non-finite guard, hooks for metrics,
eval, checkpoints, the tokenizer copy and the profiler, SIGTERM save) whose steps come from `Rollouts` (a step
with a skipped non-finite update counts as a non-finite step). A checkpoint holds state = {params, opt_state,
ref_params} and a JSON item with the replay buffer (tokens, cached log-probs, policy versions), the prompt
cursor and the group counter; sampling keys derive from (seed, step), so a resumed run makes the same
rollouts and losses as an uninterrupted one. eval_loss: see `mct.posttrain.rl.RLData`.
"""

from mct.cli.train import entry_for
from mct.config.posttrain import RLRunConfig
from mct.posttrain.rl import train

entry = entry_for(train, RLRunConfig)


if __name__ == "__main__":
    entry()

"""The post-training entry points' run configs: `Config` plus each algorithm's own section and checks.

`mct.dpo` reads a `DPORunConfig`, `mct.rl` an `RLRunConfig`, `mct.eagle` an `EagleRunConfig`; pre-training's
`Config` (and its checkpoints) carries none of these sections. Every run's learning rate is `optimizer.lr`
under the `schedule` section.
"""

import dataclasses

from mct.config.run import Config
from mct.config.schema import require
from mct.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (mct/posttrain/dpo.py):
    -log sigmoid(beta * margin of policy/reference log-ratios),
    plus sft_weight x the chosen answers' token loss (OpenBMB's script: beta 0.1, weight 0.5)."""

    path: tuple[str, ...] = (
        "default",
    )  # preference JSONL files ({"prompt", "chosen", "rejected"}) or "default"
    beta: float = 0.1
    sft_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """RL with chunk-wise rollout (mct/posttrain/rl.py; MiniCPM4 report section 3.2): GRPO advantages over group_size
    rollouts per prompt, dynamic sampling, clip-higher, dual clip, KL to a reference refreshed every
    ref_refresh_steps, overlong filtering; each step decodes at most chunk_tokens per trajectory."""

    prompts: str = ""  # JSONL of {"prompt", "answer"} or {"prompt", "tests"}; "" = embedded arithmetic task
    reward: str = "numeric"  # exact | numeric | python_tests (mct/posttrain/rewards.py)
    group_size: int = 16  # rollouts per prompt (G)
    prompts_per_step: int = 8  # new prompts (groups) entering the rollout each step
    chunk_tokens: int = (
        8192  # new tokens per trajectory per step (>= max_response_tokens: full-length rollout)
    )
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 32768
    temperature: float = 1.0
    top_p: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO)
    dual_clip: float = 3.0  # c of the dual clip, for negative advantages
    kl_beta: float = 0.001
    ref_refresh_steps: int = 100  # the reference becomes the current policy every this many steps
    overlong_filter: bool = True  # no loss on trajectories cut at max_response_tokens


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    """An EAGLE draft head trained on a frozen target (mct/posttrain/eagle.py): loss = feature_weight x
    smooth-L1 of the next feature + token_weight x cross-entropy to the target's next-token distribution
    (EAGLE section 3.2: 1.0 and 0.1)."""

    target: str = ""  # the target run's workdir (python -m mct.eagle --target WORKDIR)
    feature_weight: float = 1.0
    token_weight: float = 0.1


@dataclasses.dataclass(frozen=True)
class DPORunConfig(Config):
    """One DPO run (python -m mct.dpo): a run config with the `dpo` section."""

    dpo: DPOConfig = DPOConfig()

    def validate(self, n_devices: int, n_processes: int = 1) -> None:
        d = self.dpo
        require(d.beta > 0 and d.sft_weight >= 0, f"dpo.beta={d.beta} must be > 0, dpo.sft_weight >= 0")
        super().validate(n_devices, n_processes)


@dataclasses.dataclass(frozen=True)
class EagleRunConfig(Config):
    """One draft-head run (python -m mct.eagle): a run config with the `eagle` section; its model section is
    the target's (the head has the target's width, heads and RoPE)."""

    eagle: EagleConfig = EagleConfig()

    def validate(self, n_devices: int, n_processes: int = 1) -> None:
        e = self.eagle
        require(
            e.feature_weight >= 0 and e.token_weight >= 0 and e.feature_weight + e.token_weight > 0,
            f"eagle.feature_weight={e.feature_weight} and eagle.token_weight={e.token_weight} must be >= 0, "
            "not both 0",
        )
        super().validate(n_devices, n_processes)


@dataclasses.dataclass(frozen=True)
class RLRunConfig(Config):
    """One RL run (python -m mct.rl): a run config with the `rl` section.

    The lr is optimizer.lr under the schedule section, as in every run (there is no RL-only lr): MiniCPM4's
    RL lr is a constant 1e-5, which an RL experiment config sets as optimizer.lr with
    schedule.warmup_fraction = schedule.decay_fraction = 0 (experiments/configs/tiny_cpu_rl.py)."""

    rl: RLConfig = RLConfig()

    def validate(self, n_devices: int, n_processes: int = 1) -> None:
        check_rl(self.rl)
        check_rl_fit(self, n_processes)
        super().validate(n_devices, n_processes)


def check_rl(r: RLConfig) -> None:
    """Ranges of the RL settings."""
    for key in (
        "group_size",
        "prompts_per_step",
        "chunk_tokens",
        "max_prompt_tokens",
        "max_response_tokens",
        "ref_refresh_steps",
    ):
        require(getattr(r, key) > 0, f"rl.{key}={getattr(r, key)} must be positive")
    require(
        r.group_size > 1, f"rl.group_size={r.group_size} must be > 1 (advantages are relative to the group)"
    )
    require(
        r.reward in ("exact", "numeric", "python_tests"),
        f"rl.reward={r.reward!r} is not one of exact, numeric, python_tests",
    )
    require(
        r.temperature >= 0 and 0 < r.top_p <= 1,
        f"rl.temperature={r.temperature} must be >= 0 and rl.top_p={r.top_p} in (0, 1]",
    )
    require(
        0 <= r.eps_low < 1 and r.eps_high >= 0, f"rl.eps_low={r.eps_low} must be in [0, 1), rl.eps_high >= 0"
    )
    require(r.dual_clip > 1, f"rl.dual_clip={r.dual_clip} must be > 1")
    require(r.kl_beta >= 0, f"rl.kl_beta={r.kl_beta} must be >= 0")


def check_rl_fit(c: RLRunConfig, n_processes: int) -> None:
    """A prompt and its response fit the training rows and the model's positions; RL runs in one process."""
    total = c.rl.max_prompt_tokens + c.rl.max_response_tokens
    require(
        total <= c.data.seq_len,
        f"rl.max_prompt_tokens + rl.max_response_tokens = {total} exceeds "
        f"data.seq_len={c.data.seq_len} (the training rows)",
    )
    require(
        total <= c.model.max_position,
        f"rl.max_prompt_tokens + rl.max_response_tokens = {total} exceeds "
        f"model.max_position={c.model.max_position}",
    )
    if n_processes > 1:
        raise ConfigError("mct.rl runs in one process (its devices may be several); got a multi-process job")

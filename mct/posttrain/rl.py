"""RL with chunk-wise rollout (MiniCPM4 report section 3.2).

Every step: rl.prompts_per_step new prompts enter as groups of rl.group_size trajectories, merged with the
trajectories carried over in the replay buffer; one chunk (mct.posttrain.rollout) is decoded with the current params;
finished trajectories get their reward; every group whose G trajectories are all finished leaves the buffer,
gets group-normalised advantages, is dropped when uniform (dynamic sampling) and trains in mini-batches of
train.batch_size rows through `mct.train.trainer.build`'s step with the GRPO objective (mct/posttrain/grpo.py). The
reference policy is the params of the last multiple of rl.ref_refresh_steps. The lr is optimizer.lr under the
schedule, as in every run (an RL config makes it constant: mct.config.posttrain.RLRunConfig).

The run is every run's shell (mct.run.training_run: lock, resume, the Trainer's non-finite guard, hooks for metrics,
eval, checkpoints, the tokenizer copy and the profiler, SIGTERM save) whose steps come from `Rollouts` (a step
with a skipped non-finite update counts as a non-finite step). A checkpoint holds state = {params, opt_state,
ref_params} and a JSON item with the replay buffer (tokens, cached log-probs, policy versions), the prompt
cursor and the group counter; sampling keys derive from (seed, step), so a resumed run makes the same
rollouts and losses as an uninterrupted one. eval_loss: see `RLData`.
"""

import dataclasses
import logging
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data_pipelines.chat import encode_chat, im_end_id
from data_pipelines.loader import dataset_tokenizer
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import EOS, TextTokenizer, has_tokenizer, load_tokenizer
from mct.config.posttrain import RLRunConfig
from mct.errors import UserError
from mct.infer.decoding import Sampling
from mct.parallel.distributed import global_batch
from mct.posttrain.chat_data import arithmetic_problem, read_jsonl
from mct.posttrain.grpo import accepted_groups, group_advantages, grpo_objective, token_logprobs
from mct.posttrain.rewards import ANSWER_KEYS, REWARDS, Reward, parse_math, safe_reward, sandbox_bwrap
from mct.posttrain.rollout import Trajectory, rollout_chunk
from mct.posttrain.sft import with_source_data
from mct.run.checkpoint import Checkpointer
from mct.run.init_from import init_from_state, parse_spec
from mct.run.training_run import RunData, first_dataset
from mct.run.training_run import train as run_train
from mct.train.hooks import StepLog
from mct.train.metrics import MetricsWriter
from mct.train.trainer import TrainSetup

log = logging.getLogger("mct.train")


def arithmetic_items(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """The embedded task: n distinct questions of SFT's generated arithmetic (mct.posttrain.chat_data), none in exclude,
    with their answers."""
    rng, items, seen = np.random.default_rng(seed), [], set(exclude)
    while len(items) < n:
        question, value = arithmetic_problem(rng)
        if question not in seen:
            seen.add(question)
            items.append({"prompt": question, "answer": str(value)})
    return items


def item_problem(item: dict, reward: str) -> str | None:
    """Why a prompt item can never score under `reward`, or None: the prompt is not a string, the answer is
    not a string or number (or, for `numeric`, nothing SymPy reads), the tests are not an assert statement or
    a non-empty list of them. Such an item would only ever add zero rewards."""
    if not isinstance(item["prompt"], str):
        return f'"prompt" must be a string, got {item["prompt"]!r:.60}'
    if ANSWER_KEYS[reward] == "tests":
        tests = item["tests"]
        listed = tests if isinstance(tests, list) and tests else [tests]
        if all(isinstance(t, str) and t.strip() for t in listed):
            return None
        return f'"tests" must be an assert statement or a non-empty list of them, got {tests!r:.60}'
    answer = item["answer"]
    if not isinstance(answer, str | int | float) or isinstance(answer, bool):
        return f'"answer" must be a string or a number, got {answer!r:.60}'
    if reward == "numeric" and parse_math(str(answer)) is None:
        return f'"answer" {answer!r:.60} is not a number or expression the numeric reward reads'
    return None


def read_prompts(path: str, reward: str) -> list[dict]:
    """The items of a prompts JSONL; DatasetError naming the file and line of a malformed one or one that can
    never score (item_problem)."""
    key = ANSWER_KEYS[reward]
    items = []
    for where, item in read_jsonl(path, ("prompt", key)):
        problem = item_problem(item, reward)
        if problem:
            raise DatasetError(f"{where}: {problem} (rl.reward={reward})")
        items.append(item)
    if not items:
        raise UserError(f"config rl.prompts={path}: no prompts in the file")
    return items


def encode_prompts(
    items: list[dict], tokenizer: TextTokenizer, max_tokens: int, source: str
) -> list[list[int]]:
    """Each item's prompt as a user turn plus the assistant header (data_pipelines.chat); too long is a UserError."""
    encoded = []
    for i, item in enumerate(items):
        ids, _ = encode_chat(
            tokenizer, [{"role": "user", "content": item["prompt"]}], add_generation_prompt=True
        )
        if len(ids) > max_tokens:
            raise UserError(
                f"{source}: prompt {i} has {len(ids)} tokens, over rl.max_prompt_tokens={max_tokens}"
            )
        encoded.append(ids)
    return encoded


@dataclasses.dataclass
class RLState:
    """The host side of an RL run that a checkpoint keeps (JSON): replay buffer, prompt cursor, group ids."""

    cursor: int = 0  # prompts drawn so far (the order is a seeded permutation per epoch)
    next_group: int = 0
    groups: dict[int, int] = dataclasses.field(default_factory=dict)  # group -> prompt index
    buffer: list[Trajectory] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "cursor": self.cursor,
            "next_group": self.next_group,
            "groups": {str(g): i for g, i in self.groups.items()},
            "buffer": [dataclasses.asdict(t) for t in self.buffer],
        }

    @classmethod
    def from_json(cls, d: dict) -> "RLState":
        return cls(
            d["cursor"],
            d["next_group"],
            {int(g): i for g, i in d["groups"].items()},
            [Trajectory(**t) for t in d["buffer"]],
        )


def draw_prompts(state: RLState, n_items: int, count: int, seed: int) -> list[int]:
    """The next `count` prompt indices: a fresh seeded permutation of the prompts every epoch."""
    out = []
    for _ in range(count):
        epoch, offset = divmod(state.cursor, n_items)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[offset]))
        state.cursor += 1
    return out


def training_rows(
    trajectories: list[Trajectory], advantages: list[float], seq_len: int, overlong_filter: bool
) -> dict[str, np.ndarray]:
    """Rows [n, seq_len] of prompt + response: the model reads tokens and predicts targets; loss_mask,
    old_logp and advantages sit on the positions whose target is a response token (0 on overlong ones)."""
    n = len(trajectories)
    rows = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    rows |= {k: np.zeros((n, seq_len), np.float32) for k in ("loss_mask", "old_logp", "advantages")}
    for r, (t, a) in enumerate(zip(trajectories, advantages)):
        seq = t.prompt + t.response
        length, first = len(seq) - 1, len(t.prompt) - 1  # inputs; the first index predicting a response token
        rows["tokens"][r, :length], rows["targets"][r, :length] = seq[:-1], seq[1:]
        rows["positions"][r, :length], rows["segment_ids"][r, :length] = np.arange(length), 1
        rows["old_logp"][r, first:length] = t.logprobs
        rows["advantages"][r, first:length] = a
        rows["loss_mask"][r, first:length] = 0.0 if (overlong_filter and t.truncated) else 1.0
    return rows


def run_tokenizer(config: RLRunConfig) -> TextTokenizer:
    """The tokenizer of init_from's workdir, else of the data mixture's first dataset."""
    if config.init_from:
        directory = parse_spec(config.init_from)[0]
        if not has_tokenizer(directory):
            raise UserError(f"config init_from={config.init_from}: no tokenizer in {directory}")
        return load_tokenizer(directory)
    return dataset_tokenizer(first_dataset(config))


class Rollouts:
    """RL's StepSource: each step rolls one chunk out with the current params, trains on the completed groups
    and refreshes the reference. The state is {params, opt_state, ref_params}; the replay buffer, prompt cursor
    and group ids (`host`) are what checkpoints keep of it."""

    def __init__(self, setup: TrainSetup, host: RLState, reward: Reward):
        self.setup, self.host, self.reward = setup, host, reward
        config = self.config = setup.config
        r = config.rl
        self.tokenizer = run_tokenizer(config)
        source = r.prompts or "the embedded arithmetic task"
        self.items = read_prompts(r.prompts, r.reward) if r.prompts else arithmetic_items(512, seed=0)
        self.prompt_ids = encode_prompts(self.items, self.tokenizer, r.max_prompt_tokens, source)
        self.stop_ids = [im_end_id(self.tokenizer), self.tokenizer.token_to_id(EOS)]
        self.sampling = Sampling(r.temperature, r.top_p)
        temperature = r.temperature or 1.0
        model = setup.model
        self.ref_fn = jax.jit(lambda p, b: token_logprobs(model.bind(p), b, temperature))

    def get_state(self) -> dict:
        return self.host.to_json()

    def close(self) -> None:
        """Nothing runs in the background."""

    def step(self, state: dict, step: int) -> tuple[dict, dict]:
        """One RL step: rollout, rewards, group completion, updates, reference refresh; its host metrics."""
        t0 = time.perf_counter()
        metrics = self.rollout(state["params"], step)
        t1 = time.perf_counter()
        trajectories, advantages, group_metrics = self.complete_groups()
        state, update_metrics = self.train_rows(state, step, trajectories, advantages)
        jax.block_until_ready(state)
        t2 = time.perf_counter()
        if (step + 1) % self.config.rl.ref_refresh_steps == 0:
            state = {**state, "ref_params": jax.tree.map(jnp.copy, state["params"])}
        return state, metrics | group_metrics | update_metrics | {"rollout_s": t1 - t0, "train_s": t2 - t1}

    def rollout(self, params: dict, step: int) -> dict:
        """Adds this step's new groups to the buffer and decodes one chunk of every unfinished trajectory."""
        r, host = self.config.rl, self.host
        for index in draw_prompts(host, len(self.items), r.prompts_per_step, self.config.seed):
            host.groups[host.next_group] = index
            host.buffer += [
                Trajectory(host.next_group, list(self.prompt_ids[index])) for _ in range(r.group_size)
            ]
            host.next_group += 1
        pending = [t for t in host.buffer if not t.finished]
        key = jax.random.fold_in(jax.random.key(self.config.seed), step)
        with jax.set_mesh(
            None
        ):  # the decoder runs where the params are, outside the train step's mesh context
            decoded = rollout_chunk(
                self.setup.model.cfg,
                params,
                pending,
                chunk_tokens=r.chunk_tokens,
                max_response_tokens=r.max_response_tokens,
                stop_ids=self.stop_ids,
                sampling=self.sampling,
                key=key,
                version=step,
                slots=r.group_size * r.prompts_per_step,
            )
        for t in pending:
            if t.finished:
                text = self.tokenizer.decode(t.response[:-1] if not t.truncated else t.response)
                t.reward = safe_reward(self.reward, text, self.items[host.groups[t.group]])
        return {"tokens_decoded": decoded, "finished": sum(t.finished for t in pending)}

    def complete_groups(self) -> tuple[list[Trajectory], list[float], dict]:
        """Takes the groups whose G trajectories are all finished out of the buffer; returns the trajectories of
        the accepted (non-uniform) ones with their advantages, and the reward metrics."""
        host = self.host
        by_group: dict[int, list[Trajectory]] = {}
        for t in host.buffer:
            by_group.setdefault(t.group, []).append(t)
        done = {g: ts for g, ts in by_group.items() if all(t.finished for t in ts)}
        host.buffer = [t for t in host.buffer if t.group not in done]
        for g in done:
            del host.groups[g]
        metrics = {"completed_groups": len(done), "accepted_groups": 0, "chunk_carried": len(host.buffer)}
        if not done:
            return [], [], metrics
        rewards = np.array([[t.reward for t in ts] for ts in done.values()])  # [groups, G]
        keep, advantages = accepted_groups(rewards), group_advantages(rewards)
        lengths = [len(t.response) for ts in done.values() for t in ts]
        metrics |= {
            "reward_mean": float(rewards.mean()),
            "accepted_groups": int(keep.sum()),
            "response_len_mean": float(np.mean(lengths)),
            "truncated_fraction": float(np.mean([t.truncated for ts in done.values() for t in ts])),
        }
        chosen = [
            (t, float(a)) for k, ts, adv in zip(keep, done.values(), advantages) if k for t, a in zip(ts, adv)
        ]
        return [t for t, _ in chosen], [a for _, a in chosen], metrics

    def train_rows(
        self, state: dict, step: int, trajectories: list[Trajectory], advantages: list[float]
    ) -> tuple[dict, dict]:
        """Mini-batch updates of the state over the rows; (state, token-weighted loss metrics and "ok": no update
        was skipped as non-finite)."""
        c, setup = self.config, self.setup
        if not trajectories:
            return state, {"ok": True}
        rows = training_rows(trajectories, advantages, c.data.seq_len, c.rl.overlong_filter)
        batch = c.train.batch_size
        padded = math.ceil(len(trajectories) / batch) * batch
        rows = {k: np.pad(v, ((0, padded - len(v)), (0, 0))) for k, v in rows.items()}  # [padded, seq_len]
        ref_params, train_state = (
            state["ref_params"],
            {"params": state["params"], "opt_state": state["opt_state"]},
        )
        sums: dict[str, float] = {"tokens": 0.0, "updates": 0.0}
        ok = True
        for first in range(0, padded, batch):
            device_batch = global_batch(
                {k: v[first : first + batch] for k, v in rows.items()}, setup.batch_sharding
            )
            device_batch["ref_logp"] = self.ref_fn(ref_params, device_batch)
            train_state, metrics = setup.step_fn(train_state, device_batch, jnp.int32(step))
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            ok = ok and bool(m["ok"])
            if not m["ok"]:  # the update was skipped
                continue
            for k, v in m.items():
                if k not in ("ok", "lr", "tokens"):
                    sums[k] = sums.get(k, 0.0) + v * (m["tokens"] if k != "grad_norm" else 1.0)
            sums["tokens"] += m["tokens"]
            sums["updates"] += 1
        tokens, updates = max(sums.pop("tokens"), 1.0), sums.pop("updates")
        out = {k: v / (max(updates, 1.0) if k == "grad_norm" else tokens) for k, v in sums.items()}
        lr = float(setup.schedule(step))
        return {**train_state, "ref_params": ref_params}, out | {
            "loss_tokens": tokens,
            "updates": updates,
            "lr": lr,
            "ok": ok,
        }


class RolloutLog(StepLog):
    """RL's metrics line: the step's rollout, group and update metrics as they are."""

    def postfix(self, line: dict) -> str:
        return (
            f"reward {line.get('reward_mean', float('nan')):.3f} | groups {line['accepted_groups']}/"
            f"{line['completed_groups']} | carried {line['chunk_carried']}"
        )


class RLData(RunData):
    """RL as a kind of run of the run shell (mct.run.training_run): its state adds the reference params, its steps
    are `Rollouts`, its tokenizer is init_from's. eval_loss (every eval.every_steps; not at the last step
    unless it is one) is the policy's token loss on the held-out split of data.mixture: with init_from, the
    source run's mixture (an SFT source: its chat files' assistant tokens), the distribution RL starts from."""

    # only every eval.every_steps: RL's held-out loss is a drift check, not the run's result
    final_eval = False

    def __init__(self, reward: Reward | None):
        self.reward = reward

    def initial_state(self, setup: TrainSetup, ckpt: Checkpointer) -> tuple[int, dict, dict | None]:
        """The latest checkpoint, else init_from's params (or fresh ones) with a fresh optimizer state and the
        reference = the params."""
        abstract = {**setup.abstract_state, "ref_params": setup.abstract_state["params"]}
        restored = ckpt.restore_latest(abstract, setup.config.model)
        if restored is not None:
            log.info("resumed RL from %s step %d", ckpt.directory, restored[0])
            return restored
        config = setup.config
        state = (
            init_from_state(config.init_from, setup) if config.init_from else setup.init_state(config.seed)
        )
        return 0, {**state, "ref_params": jax.tree.map(jnp.copy, state["params"])}, None

    def source(self, setup: TrainSetup, state: dict | None) -> Rollouts:
        host = RLState() if state is None else RLState.from_json(state)
        return Rollouts(setup, host, self.reward or REWARDS[setup.config.rl.reward])

    def eval_sets(self, setup: TrainSetup) -> dict[str, list]:
        """The held-out batches when the run reaches an eval step, else none (RL from a run without prepared
        data, e.g. an imported model, reads no data)."""
        c = setup.config
        return super().eval_sets(setup) if c.eval.every_steps <= c.train.steps else {}

    def merge(self, states: list[dict]) -> dict:
        return states[0]  # one process

    def ids_tokenizer(self, config: RLRunConfig) -> TextTokenizer:
        return run_tokenizer(config)

    def metrics_log(
        self, config: RLRunConfig, writer: MetricsWriter, bar: tqdm, start: int, n_devices: int
    ) -> StepLog:
        return RolloutLog(writer, bar, start)


def rl_config(config: RLRunConfig) -> RLRunConfig:
    """With init_from, `config` reading the source run's data mixture (the eval set) and lr (lr_from_init)."""
    return with_source_data(config) if config.init_from else config


def train(
    config: RLRunConfig,
    devices: list | None = None,
    stop: threading.Event | None = None,
    reward: Reward | None = None,
) -> dict:
    """Runs (or resumes) RL to train.steps; returns the last logged metrics. `reward` overrides rl.reward.
    The code reward's sandbox is checked first: a machine without one refuses before any model is built."""
    r = config.rl
    if reward is None and r.reward == "python_tests":
        sandbox_bwrap()
    objective = grpo_objective(
        eps_low=r.eps_low,
        eps_high=r.eps_high,
        dual_clip=r.dual_clip,
        kl_beta=r.kl_beta,
        temperature=r.temperature or 1.0,
    )
    return run_train(rl_config(config), devices, stop, objective=objective, data=RLData(reward))

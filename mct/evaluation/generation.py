"""Generation tasks `{"prompt", "answer"}`: greedy continuations by continuous batching (mct.infer.engine),
judged by RL's `exact` and `numeric` rewards; with `chat` each prompt is a user turn of the chat format.

`generate_until` is what lm-eval's LM method of that name needs (greedy text per prompt, up to a stop), so an
lm-eval adapter wraps it as it wraps `mct.run.tasks.Scorer` for log-likelihoods.
"""

from collections.abc import Sequence

from data_pipelines.chat import im_end_id
from data_pipelines.tokenizer import EOS, TextTokenizer
from mct.config.model import ModelConfig
from mct.errors import UserError
from mct.infer.engine import generate_many
from mct.infer.generate import encode_prompts
from mct.posttrain.rewards import exact, numeric
from mct.run.task_files import Task
from mct.run.tasks import TaskResult, aggregate


def generate_until(
    cfg: ModelConfig,
    params: dict,
    tokenizer: TextTokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_id: int,
) -> list[str]:
    """The greedy continuation (text) of each encoded prompt, decoded over `batch_size` engine slots."""
    outputs = generate_many(
        cfg, params, prompts, max_new_tokens=max_new_tokens, slots=batch_size, eos_id=stop_id
    )
    return [tokenizer.decode(ids) for ids in outputs]


def check_prompt(where: str, prompt: list[int], max_new_tokens: int, max_position: int) -> None:
    """UserError at `where` for a prompt that cannot fit max_new_tokens more positions in max_position."""
    if len(prompt) + max_new_tokens > max_position:
        raise UserError(
            f"{where}: the prompt's {len(prompt)} tokens + {max_new_tokens} new ones exceed the "
            f"model's max_position={max_position}"
        )


def numeric_score(response: str, doc: dict) -> float:
    """`numeric`, 0 where the gold answer is no number SymPy reads (the example stays in the denominator)."""
    try:
        return numeric(response, doc)
    except ValueError:
        return 0.0


def generation_task(
    task: Task,
    cfg: ModelConfig,
    params: dict,
    tokenizer: TextTokenizer,
    *,
    chat: bool,
    max_new_tokens: int,
    batch_size: int,
) -> TaskResult:
    """exact_match and numeric of a generation task; a prompt that cannot fit max_new_tokens more positions
    in model.max_position is a UserError naming its file and line."""
    try:
        prompts = encode_prompts(tokenizer, [d["prompt"] for d in task.docs], chat=chat)
        stop_id = im_end_id(tokenizer) if chat else tokenizer.token_to_id(EOS)
    except ValueError as e:  # a tokenizer without the chat tokens
        raise UserError(f"task {task.name}: {e}") from None
    for i, prompt in enumerate(prompts):
        check_prompt(task.where(i), prompt, max_new_tokens, cfg.max_position)
    texts = generate_until(
        cfg, params, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_id=stop_id
    )
    samples = [
        {"doc": doc, "loglikelihoods": [], "is_greedy": [], "prediction": text}
        for doc, text in zip(task.docs, texts)
    ]
    values = [
        {"exact_match": exact(s["prediction"], s["doc"]), "numeric": numeric_score(s["prediction"], s["doc"])}
        for s in samples
    ]
    return aggregate(task, samples, values)

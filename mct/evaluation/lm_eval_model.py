"""lm-evaluation-harness's model `mct`: a run's checkpoint behind lm-eval's `LM` interface, so any harness task
whose data is on disk runs on it (`python -m mct.lm_eval --model mct --model_args workdir=W[,step=N,chat=True]
--tasks ... [--include_path DIR]`).

Scoring is mct.eval's own: `loglikelihood` and `loglikelihood_rolling` are `mct.run.tasks.Scorer`'s on the
run's mesh (packed batches of `batch_size` rows of seq_len, lm-eval's `--batch_size`; `auto` or `auto:N`:
the run's train.batch_size), `generate_until` is `mct.evaluation.generation.generate_until` (greedy, cut at
the first stop string). A request that cannot be scored whole (longer than max_position) is an error naming
its task and document, never truncated. Importing this module registers the model with lm-eval
(`register_model`, the way lm-eval 0.4.13 takes a model from outside its tree); it needs the `eval` extra.
"""

from collections.abc import Sequence

import jax
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from data_pipelines.chat import im_end_id
from data_pipelines.tokenizer import EOS
from mct.errors import UserError
from mct.evaluation.generation import check_prompt, generate_until
from mct.evaluation.harness import sharded_scorer
from mct.infer.generate import encode_prompts
from mct.run.reader import RunCheckpoint
from mct.run.tasks import check_request, encode_pairs


@register_model("mct")
class MctLM(LM):
    """One checkpoint of an mct run (`workdir`, `step`: the latest committed one by default); `chat`: generation
    prompts are user turns of the chat format, as mct.eval's --chat."""

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        chat: bool = False,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        del max_batch_size, device  # lm-eval passes them to every model; the run's mesh decides placement
        super().__init__()
        try:
            self.run = RunCheckpoint(workdir, None if step is None else int(step))
            self.tokenizer = self.run.tokenizer()
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from None
        auto = batch_size is None or str(batch_size).startswith("auto")  # lm-eval's auto and auto:N
        rows = self.run.config.train.batch_size if auto else int(batch_size)
        self.params = self.run.read_params()
        self.scorer, self.placed = sharded_scorer(self.run, self.tokenizer, self.params, rows)
        self.chat = chat

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) of each request's (context, continuation)."""
        scored = encode_pairs(self.tokenizer, [r.args for r in requests])
        for request, instance in zip(scored, requests):
            check_request(_where(instance), request, self.run.model_cfg.max_position)
        with jax.set_mesh(self.scorer.sharding.mesh):
            return self.scorer.score(self.placed, scored)

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint rolling windows of seq_len."""
        with jax.set_mesh(self.scorer.sharding.mesh):
            return self.scorer.loglikelihood_rolling(self.placed, [r.args[0] for r in requests])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy text after each context, cut before the first of its `until` strings; requests asking the
        same max_gen_toks decode together."""
        prompts = encode_prompts(self.tokenizer, [r.args[0] for r in requests], chat=self.chat)
        stop_id = im_end_id(self.tokenizer) if self.chat else self.tokenizer.token_to_id(EOS)
        settings = [_generation_settings(r) for r in requests]
        texts: list[str] = [""] * len(requests)
        for budget in sorted({n for n, _ in settings}):
            group = [i for i, (n, _) in enumerate(settings) if n == budget]
            for i in group:
                check_prompt(_where(requests[i]), prompts[i], budget, self.run.model_cfg.max_position)
            outputs = generate_until(
                self.run.model_cfg,
                self.params,
                self.tokenizer,
                [prompts[i] for i in group],
                max_new_tokens=budget,
                batch_size=self.scorer.batch_size,
                stop_id=stop_id,
            )
            for i, text in zip(group, outputs):
                texts[i] = _cut(text, settings[i][1])
        return texts


def _generation_settings(request: Instance) -> tuple[int, list[str]]:
    """(max_gen_toks, until strings) of a generate_until request; sampling is refused (mct decodes greedily)."""
    kwargs = dict(request.args[1])
    if kwargs.get("do_sample"):
        raise UserError(f"{_where(request)}: do_sample is set; the mct model decodes greedily")
    until = kwargs.get("until") or []
    return int(kwargs.get("max_gen_toks", 256)), [until] if isinstance(until, str) else list(until)


def _cut(text: str, until: Sequence[str]) -> str:
    """text up to the first occurrence of any stop string (lm-eval's convention)."""
    return text[: min((text.find(s) for s in until if s and s in text), default=len(text))]


def _where(request: Instance) -> str:
    """The task and document a request comes from, for error messages."""
    return f"task {request.task_name} doc {request.doc_id}"

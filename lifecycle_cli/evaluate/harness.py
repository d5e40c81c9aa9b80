"""`lm_eval:TASK`: lm-evaluation-harness tasks on our model, through our own implementation of
its `LM` interface (no conversion to a Hugging Face folder).

`HarnessLM` follows lm-eval's `hf` model wherever a number depends on it: the same encoding of
(context, continuation) pairs (lm-eval's `TemplateLM`), the same prefix token for an empty
context (bos, else eos), the same rolling windows for `loglikelihood_rolling`, and for
`generate_until` greedy decoding with the tokenizer's eos among the stop strings and the
context cut on the left to leave room for `max_gen_toks`. Scoring is `loglik.score` (batched);
generation is the one decoder, a batch of requests at a time.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lifecycle_cli.errors import UserError
from lifecycle_cli.evaluate.results import Metric, TaskResult

INSTALL = "lm_eval tasks need lm-evaluation-harness: pip install 'llmcycle[eval]'"
MAX_GEN_TOKS = 256  # lm-eval's default


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


def task_manager(settings):
    """lm-eval's TaskManager with --lm_eval.include_path (built once per set of folders: it
    indexes every task lm-eval ships, which takes seconds)."""
    paths = settings.lm_eval.include_path
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    for p in paths or ():
        if not Path(p).is_dir():
            raise UserError(f"--lm_eval.include_path: {p} is not a folder")
    return _manager(tuple(str(Path(p).resolve()) for p in paths or ()))


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) if paths else None)


def check(args: list[str], settings, n_checkpoints: int) -> None:
    require_lm_eval()
    manager = task_manager(settings)
    known = set(manager.all_tasks)
    missing = [a for a in args if a not in known]
    if missing:
        raise UserError(
            f"lm_eval: unknown task {missing[0]!r} (lm-eval's task names, or a task in a folder "
            "given with --lm_eval.include_path)"
        )


def make_lm(ctx):
    """Our model as an lm-eval `LM` (built here so that lm_eval is imported only when used)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from lifecycle_cli.evaluate.loglik import score
    from lifecycle_cli.generate import Generator, SamplingParams

    class HarnessLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = ctx.model, ctx.tokenizer
            self.batch_size = ctx.settings.batch_size
            self.generator = Generator(self.model, self.tokenizer)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_id
            return bos if bos is not None else self.tokenizer.eos_id

        @property
        def max_length(self) -> int:
            return self.model.max_seq_length

        @property
        def tokenizer_name(self) -> str:
            return str(ctx.checkpoint_dir).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            if add_special_tokens is None:  # as transformers' default, unless bos is there
                prefix = self.tokenizer.decode([self.prefix_token_id])
                add_special_tokens = not (prefix and string.startswith(prefix))
            return self.tokenizer.encode(string, bos=None if add_special_tokens else False)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            pairs = [(c, k) for _, c, k in requests]
            bar = ctx.progress("lm_eval loglikelihood", len(pairs))
            scored = score(self.model, pairs, self.batch_size, bar)
            out = [(s.logprob, s.greedy) for s in scored]
            for (key, _, _), result in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, req in enumerate(requests):
                (string,) = req.args
                ids = self.tok_encode(string, add_special_tokens=False)
                for w in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                    windows.append((None, *make_disjoint_window(w)))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
                totals[i] += logprob
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = self.tokenizer.decode([self.eot_token_id])
            prompts, params = [], []
            for req in requests:
                context, gen_kwargs = req.args
                prompt, p = self.request(context, dict(gen_kwargs or {}), eos)
                prompts.append(prompt)
                params.append(p)
            bar = ctx.progress("lm_eval generate_until", len(prompts))
            out: list[str] = []
            step = max(1, self.batch_size)
            for start in range(0, len(prompts), step):
                rows = self.generator.generate_batch(
                    prompts[start : start + step], params[start : start + step]
                )
                out += [c.text for c in rows]
                bar(len(rows))
            self.model.clear_kv_cache()
            for req, text in zip(requests, out):
                self.cache_hook.add_partial("generate_until", req.args, text)
            return out

        def request(self, context: str, kw: dict, eos: str):
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_gen = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", MAX_GEN_TOKS)))
            if max_gen >= self.max_length:
                raise UserError(
                    f"lm_eval: max_gen_toks {max_gen} leaves no room for a prompt in the "
                    f"model's context of {self.max_length}"
                )
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :]
            temperature = float(kw.get("temperature", 0.0) or 0.0)
            sample = bool(kw.get("do_sample", False)) and temperature > 0
            p = SamplingParams(
                max_new_tokens=max_gen,
                temperature=temperature if sample else 0.0,
                top_k=kw.get("top_k") if sample else None,
                top_p=float(kw.get("top_p", 1.0) or 1.0) if sample else 1.0,
                stop=tuple(s for s in until if s),
                seed=ctx.settings.seed,
            )
            return ids, p

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            from lifecycle_cli.prompts import get_style

            style = get_style("chat_template", self.tokenizer)
            return style.render(chat_history, add_generation_prompt)

    return HarnessLM()


def run(ctx, args: list[str]) -> list[TaskResult]:
    from lm_eval import simple_evaluate

    s = ctx.settings
    seeds = {}
    if s.seed is not None:
        seeds = dict(
            random_seed=s.seed, numpy_random_seed=s.seed, torch_random_seed=s.seed,
            fewshot_random_seed=s.seed,
        )  # fmt: skip
    if s.apply_chat_template and not ctx.tokenizer.chat_template:
        raise UserError(f"--apply_chat_template: {ctx.checkpoint_dir} has no chat template")
    out = simple_evaluate(
        model=make_lm(ctx),
        tasks=list(args),
        num_fewshot=s.num_fewshot,
        limit=s.limit,
        task_manager=task_manager(s),
        apply_chat_template=s.apply_chat_template,
        log_samples=True,
        **seeds,
    )
    return task_results(out)


def task_results(out: dict) -> list[TaskResult]:
    """lm-eval's results dict as our task results: one per task, metrics with their stderr."""
    results = []
    samples = out.get("samples") or {}
    for task, values in out["results"].items():
        metrics = []
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or not filt:
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics.append(Metric(name, float(value), _number(stderr)))
        n = out.get("n-samples", {}).get(task, {}).get("effective", len(samples.get(task, [])))
        results.append(TaskResult(f"lm_eval:{task}", int(n), metrics, samples.get(task, [])))
    return results


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None

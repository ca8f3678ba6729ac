"""GRPO reward functions, chosen by name from `params.grpo.rewards`.

Every reward has TRL's signature `reward(prompts, completions, **kwargs) -> list[float | None]`:
TRL passes the dataset columns as keyword lists (`answer`, the gold number written by the
prepare stage), plus `completion_ids`, `trainer_state`, `log_extra` and `log_metric`.
Completions may be strings or TRL's chat form `[{"role": "assistant", "content": ...}]`.

Each built-in reward is made by a factory `make(fmt, **options)`, registered in `REWARDS`
under the name TRL logs it as (`rewards/<name>/mean`). The GRPO stage calls

    funcs, weights = build_reward_funcs(params.grpo.rewards, fmt, params.grpo.on_reward_error,
                                        max_completion_length=params.grpo.max_completion_length,
                                        max_error_fraction=params.grpo.max_reward_error_fraction)
    GRPOTrainer(..., reward_funcs=funcs, args=GRPOConfig(reward_weights=weights, ...))

A custom reward is named `module.path:function`; it is used as is, and its options are
passed to it as extra keyword arguments on every call.

All reading of completions goes through `answer_format.parse`, the same parser evaluation
uses; the answer is only ever the last answer block (`parse(...).strict`).

Deviations from the Unsloth GSM8K seed rewards (scores are the seeds' unless noted):
- answer_check: the 3.5 tier is "same number after normalisation" (whitespace, commas, `$`,
  trailing zeros), not whitespace only; ratios are taken exactly (Decimal), so huge numbers
  cannot overflow.
- numeric_match: the last answer block must be one number (the seed took the first number
  after the opening tag); no number scores 0.0 by default (seed: -2.5, see `no_number`).
- tag_count: 0.25 per tag (willccbb's xmlcount uses 0.125), counted over the three tags the
  model writes itself (the reasoning start tag is part of the generation prompt).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, localcontext
from typing import Any, Literal

from stages.common.answer_format import AnswerFormat, Parsed, completion_text, extract_gold, parse

log = logging.getLogger("stages.rewards")

Reward = Callable[..., list[float | None]]
OnError = Literal["zero", "abort"]


class RewardConfigError(ValueError):
    """A reward list in params cannot be built (unknown name, bad path, bad option)."""


class RewardError(RuntimeError):
    """A reward raised or returned NaN/inf during training (with on_error='abort')."""


# --------------------------------------------------------------------------- parsing helpers
def _exact_decimals(digits: int) -> AbstractContextManager:
    """A decimal context wide enough for `digits` digits with an unbounded exponent, for the
    division in _ratio_within (the default context rounds to 28 digits). Parsing needs none:
    normalize_number builds its Decimals from strings, which is exact at any length."""
    return localcontext(Context(prec=max(28, digits + 2), Emax=MAX_EMAX, Emin=MIN_EMIN))


def _parse(completion: object, fmt: AnswerFormat) -> Parsed:
    return parse(completion_text(completion), fmt)


def _gold(answer: object) -> str:
    """The normalised gold number from the dataset's `answer` value (`72` or `... #### 72`)."""
    if answer is None:
        raise ValueError("gold answer is None (dataset column 'answer' is empty for this row)")
    text = str(answer)
    gold = extract_gold(text)
    if gold is None:
        raise ValueError(f"gold answer {text[-80:]!r} is not a number (dataset column 'answer')")
    return gold


def _golds(name: str, answer: Sequence[object] | None, n: int) -> Sequence[object]:
    if answer is None:
        raise ValueError(f"reward {name!r} needs the dataset column 'answer' (the gold number); "
                         "TRL passes dataset columns as keyword arguments")
    if len(answer) != n:
        raise ValueError(f"reward {name!r}: {len(answer)} gold answers for {n} completions")
    return answer


def _ratio_within(guess: str, gold: str, tolerance: str) -> bool:
    """Whether guess / gold lies in [1 - tolerance, 1 + tolerance], computed exactly."""
    g, t = Decimal(guess), Decimal(gold)
    if t == 0:
        return False
    with _exact_decimals(len(guess) + len(gold)):
        ratio = g / t
        return 1 - Decimal(tolerance) <= ratio <= 1 + Decimal(tolerance)


# --------------------------------------------------------------------------- format rewards
def make_format_exact(fmt: AnswerFormat, *, score: float = 3.0) -> Reward:
    """`score` if the completion is reasoning end tag, then one answer block, nothing after; else 0."""
    def format_exact(prompts, completions, **kwargs):
        return [score if _parse(c, fmt).well_formed else 0.0 for c in completions]
    return format_exact


def make_format_approx(fmt: AnswerFormat, *, once: float = 0.5, wrong: float = -1.0) -> Reward:
    """Per tag the model writes (reasoning end, answer start, answer end): `once` if it appears
    exactly once, else `wrong`. The reasoning start tag usually ends the prompt, so it only
    costs `wrong` when it appears more than once."""
    tags = (fmt.reasoning_end, fmt.solution_start, fmt.solution_end)

    def format_approx(prompts, completions, **kwargs):
        scores = []
        for c in completions:
            text = completion_text(c)
            score = sum(once if text.count(tag) == 1 else wrong for tag in tags)
            score += wrong if text.count(fmt.reasoning_start) > 1 else 0.0
            scores.append(score)
        return scores
    return format_approx


def make_tag_count(fmt: AnswerFormat, *, per_tag: float = 0.25) -> Reward:
    """`per_tag` for each of the three tags the model writes that appears exactly once (0 to 0.75):
    partial credit that varies even for a weak model."""
    tags = (fmt.reasoning_end, fmt.solution_start, fmt.solution_end)

    def tag_count(prompts, completions, **kwargs):
        return [per_tag * sum(completion_text(c).count(tag) == 1 for tag in tags) for c in completions]
    return tag_count


def make_format_guard(fmt: AnswerFormat, *, multiple_answers: float = -1.0,
                      text_after: float = -1.0, empty_reasoning: float = -1.0) -> Reward:
    """Reward-hacking guard, a sum of penalties: more than one answer block (including one hidden
    in the reasoning), text after the final closing tag, a reasoning block with nothing in it."""
    def format_guard(prompts, completions, **kwargs):
        scores = []
        for c in completions:
            p = _parse(c, fmt)
            score = multiple_answers if len(p.answer_blocks) > 1 else 0.0
            score += text_after if p.text_after_final else 0.0
            score += empty_reasoning if p.reasoning is not None and not p.reasoning.strip() else 0.0
            scores.append(score)
        return scores
    return format_guard


# --------------------------------------------------------------------------- answer rewards
def make_answer_check(fmt: AnswerFormat, *, exact: float = 5.0, same_number: float = 3.5,
                      within_10pct: float = 2.0, within_20pct: float = 1.5, wrong: float = -2.5,
                      not_a_number: float = -4.5, no_answer: float = -2.0) -> Reward:
    """Graded correctness of the last answer block against the gold number:
    `exact` if the block is the gold text exactly; `same_number` if it is the same number after
    normalisation; `within_10pct` / `within_20pct` if guess/gold is within 10% / 20% of 1;
    `wrong` otherwise; `not_a_number` if the block holds no single number; `no_answer` if there
    is no answer block."""
    def answer_check(prompts, completions, answer=None, **kwargs):
        scores = []
        for c, raw_gold in zip(completions, _golds("answer_check", answer, len(completions))):
            gold, p = _gold(raw_gold), _parse(c, fmt)
            if not p.answer_blocks:
                scores.append(no_answer)
            elif p.answer_blocks[-1] == gold:
                scores.append(exact)
            elif p.strict is None:
                scores.append(not_a_number)
            elif p.strict == gold:
                scores.append(same_number)
            elif _ratio_within(p.strict, gold, "0.1"):
                scores.append(within_10pct)
            elif _ratio_within(p.strict, gold, "0.2"):
                scores.append(within_20pct)
            else:
                scores.append(wrong)
        return scores
    return answer_check


def make_numeric_match(fmt: AnswerFormat, *, correct: float = 3.5, wrong: float = -1.5,
                       no_number: float = 0.0) -> Reward:
    """`correct` if the last answer block is the gold number (commas, decimals, `$` normalised),
    `wrong` if it is another number, `no_number` if there is no block or it holds no number."""
    def numeric_match(prompts, completions, answer=None, **kwargs):
        scores = []
        for c, raw_gold in zip(completions, _golds("numeric_match", answer, len(completions))):
            gold, strict = _gold(raw_gold), _parse(c, fmt).strict
            scores.append(no_number if strict is None else correct if strict == gold else wrong)
        return scores
    return numeric_match


def make_correctness(fmt: AnswerFormat, *, correct: float = 1.0, wrong: float = 0.0) -> Reward:
    """`correct` if the last answer block is the gold number, else `wrong` (plain 1/0 accuracy)."""
    def correctness(prompts, completions, answer=None, **kwargs):
        golds = _golds("correctness", answer, len(completions))
        return [correct if _parse(c, fmt).strict == _gold(g) else wrong for c, g in zip(completions, golds)]
    return correctness


def make_integer_answer(fmt: AnswerFormat, *, score: float = 0.5) -> Reward:
    """`score` if the last answer block is an integer (GSM8K answers all are), else 0."""
    def integer_answer(prompts, completions, **kwargs):
        scores = []
        for c in completions:
            strict = _parse(c, fmt).strict
            scores.append(score if strict is not None and "." not in strict else 0.0)
        return scores
    return integer_answer


def make_math_equivalence(fmt: AnswerFormat, *, correct: float = 1.0, wrong: float = 0.0,
                          no_answer: float = 0.0, timeout_seconds: int = 5) -> Reward:
    """`correct` if math-verify finds the last answer block equivalent to the gold answer
    (fractions, LaTeX, percentages), else `wrong`; `no_answer` without an answer block.
    math-verify's timeouts use SIGALRM, so with timeout_seconds > 0 it must run in the main
    thread (TRL calls synchronous rewards there)."""
    try:
        math_verify = importlib.import_module("math_verify")
    except ImportError:
        raise RewardConfigError(
            "reward 'math_equivalence' needs the math-verify package: pip install math-verify "
            "(in this project's venv: pip install 'math-verify[antlr4_9_3]', the antlr version dvc uses)"
        ) from None

    def math_equivalence(prompts, completions, answer=None, **kwargs):
        scores = []
        for c, raw_gold in zip(completions, _golds("math_equivalence", answer, len(completions))):
            guess = _parse(c, fmt).answer
            if guess is None:
                scores.append(no_answer)
                continue
            gold = math_verify.parse(_gold(raw_gold), parsing_timeout=timeout_seconds)
            target = math_verify.parse(guess, parsing_timeout=timeout_seconds)
            same = math_verify.verify(gold, target, timeout_seconds=timeout_seconds)
            scores.append(correct if same else wrong)
        return scores
    return math_equivalence


# --------------------------------------------------------------------------- length reward
def make_soft_overlong(fmt: AnswerFormat, *, max_completion_length: int | None = None,
                       overlong_buffer: int | None = None, penalty: float = 1.0) -> Reward:
    """DAPO soft overlong punishment on the completion length in tokens (`completion_ids`):
    0 up to max_completion_length - overlong_buffer, then linear down to -penalty at
    max_completion_length (and -penalty beyond). max_completion_length defaults to
    params.grpo.max_completion_length; overlong_buffer must be given (DAPO: 4096 of 20480)."""
    if max_completion_length is None or overlong_buffer is None:
        raise RewardConfigError("reward 'soft_overlong' needs options max_completion_length and "
                                "overlong_buffer (tokens), e.g. {overlong_buffer: 256}")
    if not 0 < overlong_buffer <= max_completion_length:
        raise RewardConfigError(f"reward 'soft_overlong': overlong_buffer ({overlong_buffer}) must be "
                                f"in 1..max_completion_length ({max_completion_length})")
    safe = max_completion_length - overlong_buffer

    def soft_overlong(prompts, completions, completion_ids=None, **kwargs):
        if completion_ids is None:
            raise ValueError("reward 'soft_overlong' needs completion_ids (token ids, passed by TRL)")
        over = [max(len(ids) - safe, 0) for ids in completion_ids]
        return [-penalty * min(o / overlong_buffer, 1.0) if o else 0.0 for o in over]
    return soft_overlong


REWARDS: dict[str, Callable[..., Reward]] = {
    "format_exact": make_format_exact,
    "format_approx": make_format_approx,
    "tag_count": make_tag_count,
    "format_guard": make_format_guard,
    "answer_check": make_answer_check,
    "numeric_match": make_numeric_match,
    "correctness": make_correctness,
    "integer_answer": make_integer_answer,
    "math_equivalence": make_math_equivalence,
    "soft_overlong": make_soft_overlong,
}


# --------------------------------------------------------------------------- building
def _check_options(name: str, func: Callable, options: dict[str, Any], skip: int) -> None:
    """Fail at build time on option names the function does not take."""
    params = list(inspect.signature(func).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RewardConfigError(f"reward {name!r}: unknown option(s) {unknown}; allowed: {allowed}")
    for p in params:
        number_expected = isinstance(p.default, numbers.Real) and not isinstance(p.default, bool)
        if p.name in options and number_expected and not isinstance(options[p.name], numbers.Real):
            raise RewardConfigError(f"reward {name!r}: option {p.name} must be a number, got {options[p.name]!r}")


def _custom(path: str, options: dict[str, Any]) -> tuple[str, Reward]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardConfigError(f"custom reward {path!r}: expected 'module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardConfigError(f"custom reward {path!r}: cannot import module {module_name!r}: {err}") from err
    func = getattr(module, attr, None)
    if not callable(func):
        raise RewardConfigError(f"custom reward {path!r}: module {module_name!r} has no function {attr!r}")
    _check_options(path, func, options, skip=2)

    def custom(prompts, completions, **kwargs):
        return func(prompts, completions, **kwargs, **options)
    return attr, custom


def _resolve(name: str, options: dict[str, Any], fmt: AnswerFormat,
             defaults: dict[str, Any]) -> tuple[str, Reward]:
    if ":" in name:
        return _custom(name, options)
    factory = REWARDS.get(name)
    if factory is None:
        raise RewardConfigError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))} "
                                "(or a custom 'module.path:function')")
    _check_options(name, factory, options, skip=1)
    accepted = inspect.signature(factory).parameters
    given = {k: v for k, v in defaults.items() if k in accepted and v is not None} | options
    try:
        return name, factory(fmt, **given)
    except TypeError as err:
        raise RewardConfigError(f"reward {name!r}: bad options {options}: {err}") from err


def _excerpt(obj: object, limit: int = 300) -> str:
    if isinstance(obj, (str, dict)) or (isinstance(obj, list) and obj and isinstance(obj[-1], dict)):
        text = completion_text(obj)
    else:
        text = repr(obj)
    return text if len(text) <= limit else f"{text[:limit // 2]} [...] {text[-limit // 2:]}"


def _finite(value: object) -> float | None:
    """value as a float if it is a finite real number (numpy scalars and bools included)."""
    if not isinstance(value, numbers.Real):
        return None
    try:
        score = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return score if math.isfinite(score) else None


def _sample_kwargs(kwargs: dict[str, Any], n: int, i: int) -> dict[str, Any]:
    """The keyword arguments for sample i alone: per-sample lists sliced, the rest as is."""
    return {k: v[i:i + 1] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}


def _guard(name: str, func: Reward, on_error: OnError, max_error_fraction: float = 1.0) -> Reward:
    """Wrap a reward so an exception or a NaN/inf score is reported per sample, and counted.

    abort: raise RewardError naming the reward, the error and the sample.
    zero: log a warning with the same details and score that sample 0.0. The share of this
    batch's samples that failed goes to TRL's `log_metric` as `reward_errors/<name>` (0 when none
    did), and once the reward has failed on more than `max_error_fraction` of all the samples it
    scored in this process, RewardError stops training.
    """
    totals = {"errors": 0, "samples": 0}

    def fail(i: int, problem: str, prompts: Sequence, completions: Sequence, errors: list[int],
             cause: BaseException | None = None) -> float:
        message = (f"reward {name!r} {problem} on sample {i}\n"
                   f"  prompt: {_excerpt(prompts[i])!r}\n  completion: {_excerpt(completions[i])!r}")
        if on_error == "abort":
            raise RewardError(message) from cause
        errors.append(i)
        log.warning("%s\n  scored 0.0 (grpo.on_reward_error: zero)", message)
        return 0.0

    def checked(i: int, value: object, prompts: Sequence, completions: Sequence, errors: list[int]) -> float | None:
        if value is None:  # TRL's "does not apply to this sample"
            return None
        score = _finite(value)
        if score is None:
            return fail(i, f"returned {value!r} (not a finite number)", prompts, completions, errors)
        return score

    def score_one(i: int, prompts: Sequence, completions: Sequence, kwargs: dict,
                  errors: list[int]) -> tuple[float | None, bool]:
        """Sample i scored alone, and whether it failed."""
        try:
            (value,) = func(prompts[i:i + 1], completions[i:i + 1], **_sample_kwargs(kwargs, len(completions), i))
        except Exception as err:  # noqa: BLE001 - reported by fail(): raised or logged, never hidden
            return fail(i, f"raised {type(err).__name__}: {err}", prompts, completions, errors, err), True
        return checked(i, value, prompts, completions, errors), False

    def count(errors: list[int], n: int, log_metric: Callable[[str, float], None] | None) -> None:
        totals["errors"] += len(errors)
        totals["samples"] += n
        if log_metric is not None and n:
            log_metric(f"reward_errors/{name}", len(errors) / n)
        share = totals["errors"] / max(totals["samples"], 1)
        if errors and share > max_error_fraction:
            raise RewardError(
                f"reward {name!r} failed on {totals['errors']} of the {totals['samples']} samples it scored "
                f"({share:.1%}), more than grpo.max_reward_error_fraction ({max_error_fraction}); "
                "the warnings above show the failing samples")

    def scored(prompts, completions, kwargs: dict, errors: list[int]) -> list[float | None]:
        n = len(completions)
        try:
            scores = list(func(prompts, completions, **kwargs))
        except Exception as batch_err:  # noqa: BLE001 - re-run per sample to name the failing one
            results = [score_one(i, prompts, completions, kwargs, errors) for i in range(n)]
            if not any(failed for _, failed in results):
                message = (f"reward {name!r} raised {type(batch_err).__name__}: {batch_err} on a batch of "
                           f"{n}, but every sample scored alone without error")
                if on_error == "abort":
                    raise RewardError(message) from batch_err
                log.warning("%s; using the per-sample scores", message)
            return [score for score, _ in results]
        if len(scores) != n:
            raise RewardError(f"reward {name!r} returned {len(scores)} scores for {n} completions")
        return [checked(i, s, prompts, completions, errors) for i, s in enumerate(scores)]

    def guarded(prompts, completions, **kwargs):
        errors: list[int] = []
        scores = scored(prompts, completions, kwargs, errors)
        count(errors, len(completions), kwargs.get("log_metric"))
        return scores

    guarded.__name__ = guarded.__qualname__ = name
    guarded.__doc__ = func.__doc__
    return guarded


def build_reward_funcs(specs: Iterable[Any], fmt: AnswerFormat, on_error: OnError = "abort", *,
                       max_completion_length: int | None = None,
                       max_error_fraction: float = 1.0) -> tuple[list[Reward], list[float]]:
    """Reward functions and weights for GRPOTrainer from `params.grpo.rewards`.

    specs: RewardSpec-like objects with `name`, `weight`, `options`.
    on_error: params.grpo.on_reward_error ("abort" raises RewardError, "zero" logs and scores 0).
    max_error_fraction: params.grpo.max_reward_error_fraction; with "zero", the share of failed
    samples per reward above which RewardError stops training (1.0: never).
    max_completion_length: params.grpo.max_completion_length, the default for soft_overlong.
    Each function's `__name__` is its reward name (custom ones: the function name); names must
    be unique because TRL logs `rewards/<name>/mean`.
    """
    if on_error not in ("zero", "abort"):
        raise RewardConfigError(f"on_error: got {on_error!r}; allowed: 'zero', 'abort'")
    if not 0.0 <= max_error_fraction <= 1.0:
        raise RewardConfigError(f"max_error_fraction: got {max_error_fraction!r}; allowed: 0.0 to 1.0")
    defaults = {"max_completion_length": max_completion_length}
    funcs, weights = [], []
    for spec in specs:
        name, func = _resolve(spec.name, dict(spec.options), fmt, defaults)
        if name in (f.__name__ for f in funcs):
            raise RewardConfigError(f"reward {name!r} is listed twice in grpo.rewards; "
                                    "TRL logs rewards by name, so each may appear once")
        funcs.append(_guard(name, func, on_error, max_error_fraction))
        weights.append(float(spec.weight))
    if not funcs:
        raise RewardConfigError("grpo.rewards is empty; give at least one reward")
    return funcs, weights

"""Reward functions on literal completions, including adversarial ones; registry and error handling."""
from __future__ import annotations

import importlib.util
import logging
import math

import pytest

from stages.common.answer_format import DEFAULT_FORMAT, AnswerFormat, parse
from stages.common.params import RewardSpec
from stages.common.rewards import REWARDS, RewardConfigError, RewardError, build_reward_funcs

FMT = DEFAULT_FORMAT
GOOD = "I add 40 and 32.</think><SOLUTION>72</SOLUTION>"
HUGE = "10" + "0" * 399  # 10**400: beyond float and beyond the default 28-digit decimal context
HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def reward(name: str, fmt: AnswerFormat = FMT, on_error: str = "abort", **options):
    (func,), _ = build_reward_funcs([RewardSpec(name=name, options=options)], fmt, on_error)
    return func


def score(name: str, completions: list, gold: str | None = "72", **options) -> list[float]:
    kwargs = {"answer": [gold] * len(completions)} if gold is not None else {}
    return reward(name, **options)(prompts=["q"] * len(completions), completions=completions, **kwargs)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------- format rewards
def test_format_exact():
    assert score("format_exact", [
        GOOD,
        "<think>with the opening tag</think>\n<SOLUTION>72</SOLUTION>\n",
        chat(GOOD),
        "no tags at all, 72",
        "</think><SOLUTION>72</SOLUTION> and more text",
        "</think><SOLUTION>1</SOLUTION><SOLUTION>72</SOLUTION>",
        "<SOLUTION>72</SOLUTION>",
        "",
    ]) == [3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_format_approx_counts_each_tag():
    assert score("format_approx", [
        GOOD,  # three tags once
        "<think>x</think><SOLUTION>72</SOLUTION>",  # the opening tag once is fine
        "<think><think>x</think><SOLUTION>72</SOLUTION>",  # opening tag twice: penalised
        "</think><SOLUTION>1</SOLUTION><SOLUTION>2</SOLUTION>",  # answer tags twice
        "",
    ]) == [1.5, 1.5, 0.5, -1.5, -3.0]


def test_format_approx_options():
    assert score("format_approx", [GOOD, ""], once=1.0, wrong=0.0) == [3.0, 0.0]


def test_tag_count_gives_partial_credit():
    assert score("tag_count", [GOOD, "x</think> 72", "x</think><SOLUTION>72", "</think></think>", ""]) == [
        0.75, 0.25, 0.5, 0.0, 0.0]


def test_format_guard_penalises_hacks():
    assert score("format_guard", [
        GOOD,
        "</think><SOLUTION>72</SOLUTION>",  # empty reasoning
        "x</think><SOLUTION>72</SOLUTION> P.S. 73",  # text after the final tag
        "x <SOLUTION>1</SOLUTION></think><SOLUTION>72</SOLUTION>",  # answer hidden in the reasoning
        "</think><SOLUTION>1</SOLUTION><SOLUTION>2</SOLUTION>!",  # all three
        "no tags",
    ]) == [0.0, -1.0, -1.0, -1.0, -3.0, 0.0]


def test_format_rewards_follow_custom_tags():
    fmt = AnswerFormat("<reasoning>", "</reasoning>", "<answer>", "</answer>")
    (exact, approx), _ = build_reward_funcs(
        [RewardSpec(name="format_exact"), RewardSpec(name="format_approx")], fmt, "abort")
    completions = ["x</reasoning><answer>72</answer>", GOOD]
    assert exact(prompts=["q", "q"], completions=completions) == [3.0, 0.0]
    assert approx(prompts=["q", "q"], completions=completions) == [1.5, -3.0]


# --------------------------------------------------------------------------- answer rewards
def test_answer_check_tiers():
    assert score("answer_check", [
        GOOD,  # exact text
        "</think><SOLUTION> 72 </SOLUTION>",  # same after whitespace
        "</think><SOLUTION>$72.00</SOLUTION>",  # same number
        "</think><SOLUTION>70</SOLUTION>",  # within 10%
        "</think><SOLUTION>60</SOLUTION>",  # within 20%
        "</think><SOLUTION>7</SOLUTION>",  # wrong
        "</think><SOLUTION>-72</SOLUTION>",  # wrong sign is wrong, not close
        "</think><SOLUTION>seventy-two</SOLUTION>",  # not a number
        "</think> the answer is 72",  # no answer block
    ]) == [5.0, 3.5, 3.5, 2.0, 1.5, -2.5, -2.5, -4.5, -2.0]


def test_answer_check_options_and_zero_gold():
    assert score("answer_check", ["</think><SOLUTION>1</SOLUTION>", "</think><SOLUTION>0</SOLUTION>"],
                 gold="0", wrong=-1.0) == [-1.0, 5.0]


def test_answer_check_reads_gsm8k_style_gold():
    assert score("answer_check", [GOOD], gold="40 + 32 = 72\n#### 72") == [5.0]


def test_numeric_match():
    assert score("numeric_match", [
        GOOD,
        "</think><SOLUTION>$72.0</SOLUTION>",
        "</think><SOLUTION>1,072</SOLUTION>",
        "</think><SOLUTION>none</SOLUTION>",
        "no block, 72",
    ]) == [3.5, 3.5, -1.5, 0.0, 0.0]
    assert score("numeric_match", ["no block"], no_number=-0.5) == [-0.5]
    assert score("numeric_match", ["</think><SOLUTION>1,234.50</SOLUTION>"], gold="1234.5") == [3.5]


def test_correctness_and_integer_answer():
    completions = [GOOD, "</think><SOLUTION>72.5</SOLUTION>", "</think><SOLUTION>7</SOLUTION>", ""]
    assert score("correctness", completions) == [1.0, 0.0, 0.0, 0.0]
    assert score("integer_answer", completions) == [0.5, 0.0, 0.5, 0.0]


# Completions a reward hacker or a confused model writes; the answer is the last block's number.
TABLE = [
    (GOOD, "72"),
    (chat(GOOD), "72"),
    ("</think><SOLUTION>72</SOLUTION>", "72"),
    ("</think><SOLUTION>1,234</SOLUTION>", "1234"),
    ("</think><SOLUTION>$1,234.00</SOLUTION>", "1234"),
    ("</think><SOLUTION>0.50</SOLUTION>", "0.5"),
    ("</think><SOLUTION>−3</SOLUTION>", "-3"),  # Unicode minus
    ("</think><SOLUTION>٧٢</SOLUTION>", "72"),  # Arabic-Indic digits
    ("</think><SOLUTION>７２</SOLUTION>", "72"),  # full-width digits
    ("x <SOLUTION>72</SOLUTION></think><SOLUTION>71</SOLUTION>", "72"),  # right answer hidden early
    ("</think><SOLUTION>71</SOLUTION><SOLUTION>72</SOLUTION>", "72"),  # two answers: the last counts
    ("</think><SOLUTION>72 or 73</SOLUTION>", "72"),
    ("</think><SOLUTION></SOLUTION>", "72"),
    ("</think><SOLUTION>None</SOLUTION>", "72"),
    ("</think>72", "72"),  # no answer block
    ("<SOLUTION>72", "72"),  # unclosed
    ("", "72"),
]


@pytest.mark.parametrize("completion,gold", TABLE)
def test_correctness_agrees_with_parse(completion, gold):
    """Rewards and evaluation read the same answer: correctness is 1 iff parse().strict is the gold."""
    expected = 1.0 if parse(completion).strict == gold else 0.0
    assert score("correctness", [completion], gold=gold) == [expected]
    assert (score("numeric_match", [completion], gold=gold) == [3.5]) == (expected == 1.0)
    assert (score("answer_check", [completion], gold=gold)[0] >= 3.5) == (expected == 1.0)


def test_huge_numbers_do_not_overflow():
    completions = [f"</think><SOLUTION>{HUGE}</SOLUTION>", f"{HUGE} </think><SOLUTION>72</SOLUTION>",
                   f"</think><SOLUTION>{HUGE}.5</SOLUTION>"]
    assert score("answer_check", completions) == [-2.5, 5.0, -2.5]
    assert score("numeric_match", completions) == [-1.5, 3.5, -1.5]
    assert score("correctness", completions) == [0.0, 1.0, 0.0]
    assert score("integer_answer", completions) == [0.5, 0.5, 0.0]
    assert score("correctness", completions[:1], gold=HUGE) == [1.0]
    assert score("answer_check", [f"</think><SOLUTION>{HUGE[:-1]}1</SOLUTION>"], gold=HUGE) == [2.0]
    # 31 significant digits: a 28-digit decimal context would round both to the same number
    near, gold = "-1" + "0" * 29 + "1", "-1" + "0" * 30
    assert score("correctness", [f"</think><SOLUTION>{near}</SOLUTION>", f"</think><SOLUTION>{gold}</SOLUTION>"],
                 gold=gold) == [0.0, 1.0]


def test_every_builtin_survives_adversarial_completions():
    adversarial = ["", " ", chat(""), "</think>" * 50, "<SOLUTION>" * 20, f"</think><SOLUTION>{HUGE}</SOLUTION>",
                   "<think></think><SOLUTION>٣</SOLUTION>", "\x00\ufffd</think><SOLUTION>1e999</SOLUTION>"]
    n = len(adversarial)
    for name in sorted(set(REWARDS) - {"math_equivalence"}):
        options = {"overlong_buffer": 4, "max_completion_length": 8} if name == "soft_overlong" else {}
        scores = reward(name, **options)(prompts=["q"] * n, completions=adversarial, answer=["3"] * n,
                                         completion_ids=[[0] * i for i in range(n)])
        assert len(scores) == n and all(math.isfinite(s) for s in scores), name


def test_bad_gold_is_reported_with_the_sample():
    with pytest.raises(RewardError, match=r"(?s)'correctness' raised ValueError: gold answer 'n/a' is not a number.*sample 1"):
        reward("correctness")(prompts=["q", "q"], completions=[GOOD, GOOD], answer=["72", "n/a"])
    with pytest.raises(RewardError, match="gold answer is None"):
        reward("answer_check")(prompts=["q"], completions=[GOOD], answer=[None])
    with pytest.raises(RewardError, match="needs the dataset column 'answer'"):
        reward("numeric_match")(prompts=["q"], completions=[GOOD])


# --------------------------------------------------------------------------- length reward
def test_soft_overlong_is_linear_in_the_buffer():
    func = reward("soft_overlong", max_completion_length=10, overlong_buffer=4)
    lengths = [0, 6, 7, 8, 10, 12]
    scores = func(prompts=["q"] * 6, completions=[""] * 6, completion_ids=[[1] * n for n in lengths])
    assert scores == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_soft_overlong_takes_the_max_length_from_grpo_params():
    (func,), _ = build_reward_funcs([RewardSpec(name="soft_overlong", options={"overlong_buffer": 2})], FMT,
                                    max_completion_length=4)
    assert func(prompts=["q"], completions=[""], completion_ids=[[1, 2, 3]]) == [-0.5]


def test_soft_overlong_needs_its_options():
    with pytest.raises(RewardConfigError, match="needs options max_completion_length and overlong_buffer"):
        reward("soft_overlong")
    with pytest.raises(RewardConfigError, match="overlong_buffer"):
        reward("soft_overlong", max_completion_length=10, overlong_buffer=20)


# --------------------------------------------------------------------------- math-verify
def test_math_equivalence_fails_at_build_time_without_the_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "math_verify", None)  # makes the import fail
    with pytest.raises(RewardConfigError, match="pip install math-verify"):
        reward("math_equivalence")


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
def test_math_equivalence_with_the_package():
    completions = [GOOD, "</think><SOLUTION>\\frac{144}{2}</SOLUTION>", "</think><SOLUTION>71</SOLUTION>", "72"]
    assert score("math_equivalence", completions) == [1.0, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------------- registry
def length_reward(prompts, completions, scale=1.0, **kwargs):
    """A custom reward for the dotted-path test."""
    return [scale * len(c) for c in completions]


def raising_reward(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        raise ZeroDivisionError("boom in the reward")
    return [1.0] * len(completions)


def nan_reward(prompts, completions, **kwargs):
    return [math.nan if "nan" in c else 1.0 for c in completions]


def batch_only_failure(prompts, completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("fails only on whole batches")
    return [1.0]


def test_names_are_unique_and_match_the_registry():
    opts = {"soft_overlong": {"overlong_buffer": 4, "max_completion_length": 8}}
    names = sorted(n for n in REWARDS if HAS_MATH_VERIFY or n != "math_equivalence")
    funcs, weights = build_reward_funcs([RewardSpec(name=n, options=opts.get(n, {})) for n in names], FMT)
    assert [f.__name__ for f in funcs] == names
    assert len(set(names)) == len(names) and weights == [1.0] * len(names)
    for name in names:  # unwrapped, each factory's function already carries its registry name
        assert REWARDS[name](FMT, **opts.get(name, {})).__name__ == name


def test_weights_are_returned_in_order():
    specs = [RewardSpec(name="format_exact", weight=0.5), RewardSpec(name="correctness", weight=2)]
    funcs, weights = build_reward_funcs(specs, FMT, "zero")
    assert [f.__name__ for f in funcs] == ["format_exact", "correctness"] and weights == [0.5, 2.0]


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(RewardConfigError, match=r"unknown reward 'format_exactly'; available: answer_check, correctness"):
        reward("format_exactly")


def test_bad_options_fail_at_build_time():
    with pytest.raises(RewardConfigError, match=r"unknown option\(s\) \['scor'\]; allowed: \['score'\]"):
        reward("format_exact", scor=1.0)
    with pytest.raises(RewardConfigError, match="option correct must be a number"):
        reward("correctness", correct="yes")


def test_duplicate_and_empty_lists_are_rejected():
    with pytest.raises(RewardConfigError, match="'correctness' is listed twice"):
        build_reward_funcs([RewardSpec(name="correctness"), RewardSpec(name="correctness")], FMT)
    with pytest.raises(RewardConfigError, match="empty"):
        build_reward_funcs([], FMT)
    with pytest.raises(RewardConfigError, match="on_error"):
        build_reward_funcs([RewardSpec(name="correctness")], FMT, "ignore")


def test_custom_reward_by_dotted_path():
    func = reward("tests.test_rewards:length_reward", scale=2.0)
    assert func.__name__ == "length_reward"
    assert func(prompts=["q", "q"], completions=["ab", "abcd"]) == [4.0, 8.0]


@pytest.mark.parametrize("path,message", [
    ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
    ("tests.test_rewards:no_such_function", "has no function 'no_such_function'"),
    ("tests.test_rewards:", "expected 'module.path:function'"),
])
def test_bad_custom_path(path, message):
    with pytest.raises(RewardConfigError, match=message):
        reward(path)


# --------------------------------------------------------------------------- error handling
def test_abort_names_reward_error_and_sample():
    func = reward("tests.test_rewards:raising_reward")
    with pytest.raises(RewardError) as info:
        func(prompts=["q0", "q1"], completions=["fine", "boom " + "x" * 1000])
    message = str(info.value)
    assert "'raising_reward' raised ZeroDivisionError: boom in the reward on sample 1" in message
    assert "prompt: 'q1'" in message and "[...]" in message and len(message) < 600
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_abort_on_nan():
    with pytest.raises(RewardError, match=r"(?s)'nan_reward' returned nan \(not a finite number\) on sample 0.*'a nan'"):
        reward("tests.test_rewards:nan_reward")(prompts=["q"], completions=["a nan"])


def test_zero_logs_and_scores_only_the_bad_sample(caplog):
    raising = reward("tests.test_rewards:raising_reward", on_error="zero")
    nan = reward("tests.test_rewards:nan_reward", on_error="zero")
    with caplog.at_level(logging.WARNING, logger="stages.rewards"):
        assert raising(prompts=["q", "q", "q"], completions=["ok", "boom", "ok"]) == [1.0, 0.0, 1.0]
        assert nan(prompts=["q", "q"], completions=["nan", "ok"]) == [0.0, 1.0]
    records = [r for r in caplog.records if r.name == "stages.rewards"]
    assert len(records) == 2
    assert "raised ZeroDivisionError: boom in the reward on sample 1" in records[0].getMessage()
    assert "completion: 'boom'" in records[0].getMessage()
    assert "returned nan" in records[1].getMessage()


def test_zero_counts_errors_per_reward_through_log_metric():
    """TRL passes `log_metric` to every reward; each batch's failed share goes there per reward."""
    (raising, nan), _ = build_reward_funcs([RewardSpec(name="tests.test_rewards:raising_reward"),
                                            RewardSpec(name="tests.test_rewards:nan_reward")], FMT, "zero")
    logged = []

    def log_metric(name, value):
        logged.append((name, value))

    raising(prompts=["q"] * 4, completions=["ok", "boom", "ok", "boom"], log_metric=log_metric)
    nan(prompts=["q"] * 4, completions=["ok", "ok", "ok", "ok"], log_metric=log_metric)
    assert logged == [("reward_errors/raising_reward", 0.5), ("reward_errors/nan_reward", 0.0)]


def test_zero_stops_the_run_above_the_error_fraction():
    (func,), _ = build_reward_funcs([RewardSpec(name="tests.test_rewards:raising_reward")], FMT, "zero",
                                    max_error_fraction=0.2)
    assert func(prompts=["q"] * 10, completions=["boom"] + ["ok"] * 9) == [0.0] + [1.0] * 9  # 1 of 10
    assert func(prompts=["q"] * 10, completions=["boom"] + ["ok"] * 9) == [0.0] + [1.0] * 9  # 2 of 20
    assert func(prompts=["q"] * 10, completions=["boom"] * 3 + ["ok"] * 7)[:4] == [0.0] * 3 + [1.0]  # 5 of 30
    with pytest.raises(RewardError, match=r"'raising_reward' failed on 9 of the 40 samples it scored \(22.5%\), "
                                          r"more than grpo.max_reward_error_fraction \(0.2\)"):
        func(prompts=["q"] * 10, completions=["boom"] * 4 + ["ok"] * 6)


def test_batch_only_failure_is_not_hidden(caplog):
    with pytest.raises(RewardError, match="every sample scored alone without error"):
        reward("tests.test_rewards:batch_only_failure")(prompts=["q", "q"], completions=["a", "b"])
    with caplog.at_level(logging.WARNING, logger="stages.rewards"):
        func = reward("tests.test_rewards:batch_only_failure", on_error="zero")
        assert func(prompts=["q", "q"], completions=["a", "b"]) == [1.0, 1.0]
    assert "fails only on whole batches" in caplog.text


def test_a_per_sample_failure_in_a_builtin_is_sliced_with_its_kwargs():
    """The per-sample re-run slices `answer` and `completion_ids` along with the completions."""
    func = reward("correctness", on_error="zero")
    assert func(prompts=["q"] * 3, completions=[GOOD, GOOD, GOOD], answer=["72", "??", "72"],
                completion_ids=[[1], [2], [3]]) == [1.0, 0.0, 1.0]


def test_completion_of_an_unsupported_type_is_reported():
    with pytest.raises(RewardError, match="unsupported completion type: NoneType"):
        reward("format_exact")(prompts=["q"], completions=[None])

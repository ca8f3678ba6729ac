"""Stage prepare (stages/prepare.py) on the shipped GSM8K, on files with planted bad rows,
on contaminated splits, and on the synthetic and hub sources. Everything writes to tmp dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from stages import prepare
from stages.common.answer_format import DEFAULT_FORMAT, normalize_number, parse
from stages.prepare import DataError, build_splits
from tests.conftest import tiny

COLUMNS = {
    "grpo": ["prompt", "answer", "question"],
    "sft": ["prompt", "completion", "answer"],
    "eval": ["question", "answer"],
}


# ------------------------------------------------------------------ the shipped GSM8K
@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gsm8k") / "prepared"
    metrics = prepare.run(tiny({"prepare": {"max_train_rows": None, "sft_examples": 100}}), out)
    return out, metrics


def test_gsm8k_reads_every_row(gsm8k):
    out, m = gsm8k
    assert (m["rows_in_train"], m["rows_in_test"]) == (7473, 1319)
    assert m["dropped_train"] == {} and m["dropped_test"] == {}
    assert m["contamination"]["overlap_exact"] == 0
    assert (m["rows_sft"], m["rows_grpo"], m["rows_eval"]) == (100, 7373, 1319)
    json.dumps(m)  # main() writes it as JSON


def test_gsm8k_splits_are_parquet_with_the_documented_columns(gsm8k):
    out, m = gsm8k
    for name, columns in COLUMNS.items():
        frame = pd.read_parquet(out / f"{name}.parquet")
        assert list(frame.columns) == columns, name
        assert len(frame) == m[f"rows_{name}"]
        assert frame["answer"].map(lambda a: normalize_number(a) == a).all(), f"{name}: answers not normalised"


def test_grpo_prompts_hold_the_question_but_not_the_solution(gsm8k):
    out, _ = gsm8k
    grpo = pd.read_parquet(out / "grpo.parquet")
    for prompt, question in zip(grpo["prompt"], grpo["question"]):
        system, user = prompt
        assert (system["role"], user["role"]) == ("system", "user")
        assert system["content"] == DEFAULT_FORMAT.system_prompt and user["content"] == question
        assert "####" not in user["content"] and "<<" not in user["content"]


def test_sft_completions_are_in_the_answer_format_and_parse_to_the_gold(gsm8k):
    out, _ = gsm8k
    sft = pd.read_parquet(out / "sft.parquet")
    for completion, gold in zip(sft["completion"], sft["answer"]):
        (message,) = completion
        assert message["role"] == "assistant"
        p = parse(message["content"])
        assert p.well_formed and p.strict == gold
        assert "<<" not in p.reasoning and "####" not in p.reasoning


def test_sft_and_grpo_questions_are_disjoint(gsm8k):
    out, _ = gsm8k
    sft_questions = {p[1]["content"] for p in pd.read_parquet(out / "sft.parquet")["prompt"]}
    grpo_questions = set(pd.read_parquet(out / "grpo.parquet")["question"])
    assert sft_questions and not sft_questions & grpo_questions


def test_caps_and_truncation():
    splits, m = build_splits(tiny({"prepare": {"sft_examples": 5, "max_train_rows": 7, "max_test_rows": 3,
                                               "sft_max_reasoning_chars": 20}}))
    assert (len(splits["sft"]), len(splits["grpo"]), len(splits["eval"])) == (5, 7, 3)
    for completion in splits["sft"]["completion"]:
        assert len(parse(completion[0]["content"]).reasoning) <= 20


def test_same_seed_same_splits_other_seed_other_order():
    a, _ = build_splits(tiny({"prepare": {"max_train_rows": 50, "sft_examples": 10}}))
    b, _ = build_splits(tiny({"prepare": {"max_train_rows": 50, "sft_examples": 10}}))
    c, _ = build_splits(tiny({"project": {"seed": 1}, "prepare": {"max_train_rows": 50, "sft_examples": 10}}))
    assert a["grpo"].equals(b["grpo"]) and a["sft"].equals(b["sft"])
    assert list(a["grpo"]["question"]) != list(c["grpo"]["question"])


# ------------------------------------------------------------------ files with planted bad rows
GOOD = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A pen costs $1,200 cents. Write it as a number.", "answer": "#### 1,200"},
    {"question": "It was 5 degrees and fell by 8. What is it now?", "answer": "5 - 8 = -3\n#### -3"},
    {"question": "Half of 7?", "answer": "#### 3.50"},
]
BAD = [
    {"answer": "#### 1"},  # missing question
    {"question": "   ", "answer": "#### 2"},  # empty question
    {"question": "How many legs does a cat have?"},  # missing answer
    {"question": "What colour is the sky?", "answer": "#### abc"},  # non-numeric answer
    {"question": "tom has 3 apples, and buys 4 more: how many apples", "answer": "#### 7"},  # duplicate (normalised)
]
REASONS = {"empty_question": 2, "missing_answer": 1, "non_numeric_answer": 1, "duplicate": 1}
TEST = [{"question": "What is 10 + 5?", "answer": "#### 15"}, {"question": "What is 2 * 6?", "answer": "#### 12"}]


def _write(rows: list[dict], file: Path) -> str:
    if file.suffix == ".jsonl":
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows, columns=["question", "answer"]).to_csv(file, index=False)
    return str(file)


def _file_params(tmp_path: Path, train: list[dict], test: list[dict], suffix: str = ".jsonl", **prepare_overrides):
    return tiny({"prepare": {"source": "file", "sft_examples": 1, "max_train_rows": None,
                             "train_file": _write(train, tmp_path / f"train{suffix}"),
                             "test_file": _write(test, tmp_path / f"test{suffix}"), **prepare_overrides}})


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bad_rows_are_counted_by_reason_and_dropped(tmp_path, suffix):
    params = _file_params(tmp_path, GOOD[:2] + BAD + GOOD[2:], TEST, suffix, on_bad_rows="drop")
    metrics = prepare.run(params, tmp_path / "out")
    assert metrics["dropped_train"] == REASONS
    assert metrics["dropped_test"] == {}
    assert metrics["rows_in_train"] == len(GOOD) + len(BAD)
    assert metrics["rows_sft"] + metrics["rows_grpo"] == len(GOOD)
    kept = pd.read_parquet(tmp_path / "out" / "grpo.parquet")["answer"].tolist()
    kept += pd.read_parquet(tmp_path / "out" / "sft.parquet")["answer"].tolist()
    assert sorted(kept) == sorted(["7", "1200", "-3", "3.5"])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bad_rows_fail_the_stage_naming_the_reasons(tmp_path, suffix):
    params = _file_params(tmp_path, GOOD + BAD, TEST, suffix, on_bad_rows="fail")
    with pytest.raises(DataError, match="on_bad_rows=fail") as info:
        build_splits(params)
    for reason, count in REASONS.items():
        assert f"'{reason}': {count}" in str(info.value)
    assert "#### abc" in str(info.value)  # an example row is shown


def test_bad_rows_in_the_test_split_are_counted_too(tmp_path):
    params = _file_params(tmp_path, GOOD, TEST + [{"question": "Q?", "answer": "#### x"}], on_bad_rows="drop")
    splits, metrics = build_splits(params)
    assert metrics["dropped_test"] == {"non_numeric_answer": 1}
    assert len(splits["eval"]) == len(TEST)


def test_parquet_source_with_mapped_columns_and_a_solution_column(tmp_path):
    train = pd.DataFrame({"problem": [r["question"] for r in GOOD],
                          "final": ["7", "1,200", "-3", "3.5"],
                          "steps": ["3 + 4 = 7", None, "5 - 8 = -3", None]})
    train.to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"problem": ["What is 1 + 1?"], "final": ["2"], "steps": ["1 + 1 = 2"]}).to_parquet(tmp_path / "test.parquet")
    params = tiny({"prepare": {"source": "file", "sft_examples": 3, "train_file": str(tmp_path / "train.parquet"),
                               "test_file": str(tmp_path / "test.parquet"),
                               "columns": {"question": "problem", "answer": "final", "solution": "steps"}}})
    splits, metrics = build_splits(params)
    assert metrics["dropped_train"] == {}
    reasonings = {parse(c[0]["content"]).reasoning for c in splits["sft"]["completion"]}
    assert "nan" not in reasonings and "None" not in reasonings  # a missing solution falls back to the answer text
    assert splits["eval"]["answer"].tolist() == ["2"]


@pytest.mark.parametrize("overrides, message", [
    ({"source": "file", "train_file": "/nonexistent/train.jsonl", "test_file": "/nonexistent/test.jsonl"},
     "data file not found: /nonexistent/train.jsonl"),
    ({"source": "hub"}, "prepare.hub_id is not set"),
])
def test_misconfigured_sources_fail_clearly(overrides, message):
    with pytest.raises(DataError, match=message):
        build_splits(tiny({"prepare": overrides}))


def test_unsupported_file_type_and_missing_columns(tmp_path):
    (tmp_path / "train.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        build_splits(tiny({"prepare": {"source": "file", "train_file": str(tmp_path / "train.txt"),
                                       "test_file": str(tmp_path / "train.txt")}}))
    params = _file_params(tmp_path, GOOD, TEST, columns={"question": "problem"})
    with pytest.raises(DataError, match=r"missing column\(s\) \['problem'\].*prepare.columns"):
        build_splits(params)


def test_nothing_usable_left_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable rows left: train 0"):
        build_splits(_file_params(tmp_path, BAD[:4], TEST))


@pytest.mark.parametrize("name, content", [("train.jsonl", ""), ("train.jsonl", "\n  \n"), ("train.csv", ""),
                                           ("train.parquet", "")])
def test_an_empty_file_says_it_is_empty(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{tmp_path / name}: the file is empty"):
        build_splits(tiny({"prepare": {"source": "file", "train_file": str(tmp_path / name),
                                       "test_file": _write(TEST, tmp_path / "test.jsonl")}}))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_with_columns_but_no_rows_says_so(tmp_path, suffix):
    file = tmp_path / f"train{suffix}"
    empty = pd.DataFrame({"question": pd.Series(dtype=str), "answer": pd.Series(dtype=str)})
    empty.to_csv(file, index=False) if suffix == ".csv" else empty.to_parquet(file)
    with pytest.raises(DataError, match=r"no rows \(columns: \['question', 'answer'\]\)"):
        build_splits(tiny({"prepare": {"source": "file", "train_file": str(file),
                                       "test_file": _write(TEST, tmp_path / "test.jsonl")}}))


LONG = {"question": "How many? " + "x" * 50_000, "answer": "#### 3"}


def test_over_long_questions_are_dropped_and_counted(tmp_path, capsys):
    params = _file_params(tmp_path, GOOD + [LONG], TEST + [dict(LONG, answer="#### 4")], on_long_questions="drop")
    splits, metrics = build_splits(params)
    assert metrics["too_long"] == {"train": 1, "test": 1, "max_question_chars": 4000}
    assert "1 training and 1 test questions are longer than prepare.max_question_chars=4000" in capsys.readouterr().out
    kept = set(splits["grpo"]["question"]) | {p[1]["content"] for p in splits["sft"]["prompt"]} | set(splits["eval"]["question"])
    assert all(len(q) <= 4000 for q in kept) and len(splits["eval"]) == len(TEST)


def test_over_long_questions_fail_when_asked(tmp_path):
    params = _file_params(tmp_path, GOOD + [LONG], TEST, on_long_questions="fail", max_question_chars=100)
    with pytest.raises(DataError, match=r"1 training and 0 test questions are longer than prepare.max_question_chars=100; "
                                        r"e.g. 50010 chars: 'How many\? xxx.*on_long_questions=fail"):
        build_splits(params)


def test_too_few_rows_for_sft_examples_warns_in_the_metrics(tmp_path, capsys):
    params = _file_params(tmp_path, GOOD, TEST, sft_examples=256)
    splits, metrics = build_splits(params)
    assert (len(splits["sft"]), len(splits["grpo"])) == (3, 1)
    assert metrics["warnings"] == ["prepare.sft_examples is 256 but only 4 training rows are left after cleaning: "
                                   "3 become SFT examples and 1 GRPO prompt(s)"]
    assert "prepare: warning: prepare.sft_examples is 256" in capsys.readouterr().out


# ------------------------------------------------------------------ contamination
CONTAMINATED_TRAIN = GOOD + [
    {"question": "What is 10 + 5?", "answer": "#### 15"},  # exact copy of a test question
    {"question": "what is 2*6", "answer": "#### 12"},  # the same test question, normalised
]


def test_contamination_is_dropped(tmp_path):
    splits, metrics = build_splits(_file_params(tmp_path, CONTAMINATED_TRAIN, TEST, on_contamination="drop"))
    assert metrics["contamination"] == {"overlap_exact": 1, "overlap_normalized": 1, "action": "drop"}
    train_questions = set(splits["grpo"]["question"]) | {p[1]["content"] for p in splits["sft"]["prompt"]}
    assert train_questions == {r["question"] for r in GOOD}


def test_contamination_fails_when_asked(tmp_path):
    with pytest.raises(DataError, match="2 training questions also appear in the test split.*on_contamination=fail"):
        build_splits(_file_params(tmp_path, CONTAMINATED_TRAIN, TEST, on_contamination="fail"))


def test_contamination_warns_and_keeps(tmp_path, capsys):
    splits, metrics = build_splits(_file_params(tmp_path, CONTAMINATED_TRAIN, TEST, on_contamination="warn"))
    assert "2 training questions also appear in the test split" in capsys.readouterr().out
    assert len(splits["grpo"]) + len(splits["sft"]) == len(CONTAMINATED_TRAIN)
    assert metrics["contamination"]["action"] == "warn"


# ------------------------------------------------------------------ synthetic
def _synthetic(seed: int = 3407, **synthetic):
    return tiny({"project": {"seed": seed},
                 "prepare": {"source": "synthetic", "sft_examples": 10, "max_train_rows": None,
                             "synthetic": {"train_size": 200, "test_size": 50, **synthetic}}})


def test_synthetic_is_deterministic_for_a_seed():
    a, _ = build_splits(_synthetic())
    b, _ = build_splits(_synthetic())
    c, _ = build_splits(_synthetic(seed=1))
    for name in ("grpo", "sft", "eval"):
        assert a[name].equals(b[name]), name
    assert set(a["eval"]["question"]) != set(c["eval"]["question"])


def test_synthetic_train_and_test_are_disjoint_and_correct():
    splits, metrics = build_splits(_synthetic(operations=["+", "-", "*"]))
    assert (metrics["rows_sft"] + metrics["rows_grpo"], metrics["rows_eval"]) == (200, 50)
    train = set(splits["grpo"]["question"]) | {p[1]["content"] for p in splits["sft"]["prompt"]}
    assert not train & set(splits["eval"]["question"])
    for question, answer in zip(splits["eval"]["question"], splits["eval"]["answer"]):
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        assert str(eval(f"{int(a)} {op} {int(b)}")) == answer  # noqa: S307 - literal arithmetic we generated
    for completion, answer in zip(splits["sft"]["completion"], splits["sft"]["answer"]):
        assert parse(completion[0]["content"]).strict == answer


def test_synthetic_fails_when_more_problems_are_requested_than_exist():
    with pytest.raises(DataError, match="6 distinct problems requested but only 4 exist"):
        build_splits(_synthetic(min_operand=1, max_operand=2, train_size=5, test_size=1))
    splits, _ = build_splits(_synthetic(min_operand=1, max_operand=2, train_size=3, test_size=1))  # exactly all 4
    assert len(splits["eval"]) == 1


@pytest.mark.parametrize("a, b, same", [
    ("What is 4 + 5?", "what is 4+5", True),
    ("Tom has 3 apples, and 4 pears.", "tom has 3 apples and 4 pears", True),
    ("What is 4 + 5?", "What is 4 * 5?", False),  # different problems: operators are kept
    ("What is 12 - 3?", "What is 12 / 3?", False),
])
def test_normalize_text_for_duplicates(a, b, same):
    assert (prepare.normalize_text(a) == prepare.normalize_text(b)) is same

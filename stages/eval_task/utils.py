"""Data loading and answer filters for the `gsm8k_answer_format` lm-eval task.

lm-eval imports this file through the YAML's `!function` tags; stages/evaluate.py imports
it as `stages.eval_task.utils` to check the split before lm-eval starts. Both filters call
`stages.common.answer_format.parse`, the same parser the GRPO rewards use, so the score a
completion gets here is the score it got during training.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lm_eval.api.filter import Filter

from stages.common.answer_format import AnswerFormat, normalize_number, parse

NO_ANSWER = ""  # what a filter returns when it finds nothing; never equal to a gold number
EXTRACTIONS = ("strict", "lenient")


class SplitError(ValueError):
    """The evaluation split cannot be used; the message names the file and the problem."""


def read_split(eval_file: str | Path):
    """The prepared eval split as a DataFrame (question, answer = normalised gold number)."""
    import pandas as pd

    file = Path(eval_file)
    if not file.is_file():
        raise SplitError(f"evaluation split {file} not found: run the prepare stage (dvc repro prepare)")
    try:
        frame = pd.read_parquet(file)
    except (OSError, ValueError) as err:
        raise SplitError(f"evaluation split {file} is not a readable parquet file: {err}") from err
    missing = [c for c in ("question", "answer") if c not in frame.columns]
    if missing:
        raise SplitError(f"evaluation split {file} lacks column(s) {missing}; columns are {list(frame.columns)}")
    if frame.empty:
        raise SplitError(f"evaluation split {file} has no rows")
    gold = frame["answer"].map(lambda a: normalize_number(None if a is None else str(a)))
    bad = [int(i) for i in frame.index[gold.isna()][:5]]
    if bad:
        raise SplitError(f"evaluation split {file}: answer is not a number in row(s) {bad}")
    return frame.assign(question=frame["question"].astype(str).str.strip(), answer=gold)[["question", "answer"]]


def load_split(eval_file: str | None = None, answer_format: dict[str, str] | None = None, **_: Any):
    """`custom_dataset` of the task: lm-eval calls it with the TaskManager's metadata.

    Each doc carries the answer-format tags it is scored in, so the filters need no
    global state: `answer_format` comes from params (project.answer_format).
    """
    import datasets

    if not eval_file:
        raise SplitError("task gsm8k_answer_format needs metadata eval_file (the prepared eval parquet); "
                         "load it through stages.evaluate, which passes it to TaskManager(metadata=...)")
    fmt = AnswerFormat(**(answer_format or {}))
    frame = read_split(eval_file)
    frame["answer_format"] = [asdict(fmt)] * len(frame)
    return datasets.DatasetDict({"test": datasets.Dataset.from_pandas(frame, preserve_index=False)})


def extract(completion: str, fmt: AnswerFormat, extraction: str) -> str | None:
    """The answer a completion gives: `strict` from the last answer block, `lenient` the last number."""
    parsed = parse(completion, fmt)
    return parsed.strict if extraction == "strict" else parsed.lenient


class AnswerFilter(Filter):
    """lm-eval filter: each response -> its normalised answer (or NO_ANSWER).

    YAML: `function: !function utils.AnswerFilter` with `extraction: strict | lenient`.
    """

    def __init__(self, extraction: str = "strict", **kwargs: Any) -> None:
        if extraction not in EXTRACTIONS:
            raise ValueError(f"AnswerFilter extraction must be one of {EXTRACTIONS}, got {extraction!r}")
        self.extraction = extraction
        super().__init__(**kwargs)

    def apply(self, resps, docs):
        out = []
        for responses, doc in zip(resps, docs):
            fmt = AnswerFormat(**doc["answer_format"])
            out.append([extract(r, fmt, self.extraction) or NO_ANSWER for r in responses])
        return out

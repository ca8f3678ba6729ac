"""Stage `prepare`: turn a math dataset into GRPO prompts, SFT priming examples and an eval set.

    python -m stages.prepare          # reads params.yaml: project, prepare

Sources (prepare.source): the GSM8K copy shipped in data/gsm8k, a hub dataset, a local
jsonl/parquet/csv file, or built-in synthetic arithmetic. Bad rows are counted by reason
and dropped or fail the stage (prepare.on_bad_rows); questions longer than
prepare.max_question_chars are counted and dropped or fail it (prepare.on_long_questions), since
a model's context would silently cut them; train/test overlap is checked (prepare.on_contamination).
An empty file or one without rows says so. Writes three parquet files and a metrics JSON.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from stages.common import tracking
from stages.common.answer_format import AnswerFormat, extract_gold, worked_solution
from stages.common.dataset import dataset_name
from stages.common.params import Params, PrepareParams, load_params
from stages.common.paths import path, write_metrics


class DataError(ValueError):
    """The dataset cannot be used as configured; the message says which rows and why."""


# ------------------------------------------------------------------ sources
def _read_table(file: str | Path) -> pd.DataFrame:
    file = Path(file)
    if not file.exists():
        raise DataError(f"data file not found: {file}")
    suffix = file.suffix.lower()
    if file.stat().st_size == 0 or (suffix != ".parquet" and not file.read_text(errors="replace").strip()):
        raise DataError(f"{file}: the file is empty")
    if suffix in (".jsonl", ".json"):
        return pd.read_json(file, lines=suffix == ".jsonl", dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(file)
    if suffix == ".csv":
        return pd.read_csv(file, dtype=str, keep_default_na=False)
    raise DataError(f"{file}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")


def _rows(frame: pd.DataFrame, p: PrepareParams, origin: str) -> list[dict]:
    cols = p.columns
    if frame.empty:
        raise DataError(f"{origin}: no rows (columns: {list(frame.columns)})")
    needed = [cols.question, cols.answer] + ([cols.solution] if cols.solution else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{origin}: missing column(s) {missing}; columns are {list(frame.columns)} "
                        "(map them with prepare.columns)")
    out = []
    for rec in frame.to_dict("records"):
        out.append({
            "question": rec.get(cols.question),
            "answer": rec.get(cols.answer),
            "solution": rec.get(cols.solution) if cols.solution else None,
        })
    return out


def synthetic_rows(p: PrepareParams, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic arithmetic problems: 'What is 47 + 85?' with the worked line '47 + 85 = 132'."""
    s = p.synthetic
    rng = random.Random(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen: set[tuple] = set()
    want = s.train_size + s.test_size
    space = (s.max_operand - s.min_operand + 1) ** 2 * len(s.operations)
    if want > space:
        raise DataError(f"prepare.synthetic: {want} distinct problems requested but only {space} exist; "
                        "widen the operand range or lower train_size/test_size")
    rows = []
    while len(rows) < want:
        a, b = rng.randint(s.min_operand, s.max_operand), rng.randint(s.min_operand, s.max_operand)
        op = rng.choice(s.operations)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        c = ops[op](a, b)
        rows.append({"question": f"What is {a} {op} {b}?", "answer": f"#### {c}", "solution": f"{a} {op} {b} = {c}"})
    return rows[: s.train_size], rows[s.train_size:]


def load_source(p: PrepareParams, seed: int) -> tuple[list[dict], list[dict]]:
    """Raw (train, test) rows with keys question, answer, solution."""
    if p.source == "synthetic":
        return synthetic_rows(p, seed)
    if p.source == "gsm8k":
        root = path("gsm8k")
        defaults = PrepareParams()
        p = p.model_copy(update={"columns": defaults.columns})
        return (_rows(_read_table(root / "train.jsonl"), p, "data/gsm8k/train.jsonl"),
                _rows(_read_table(root / "test.jsonl"), p, "data/gsm8k/test.jsonl"))
    if p.source == "file":
        return (_rows(_read_table(p.train_file), p, p.train_file), _rows(_read_table(p.test_file), p, p.test_file))
    if not p.hub_id:
        raise DataError("prepare.source is 'hub' but prepare.hub_id is not set")
    import datasets  # only the hub path needs it

    def split(name: str) -> list[dict]:
        ds = datasets.load_dataset(p.hub_id, p.hub_config, split=name)
        return _rows(ds.to_pandas(), p, f"{p.hub_id}[{name}]")

    return split(p.train_split), split(p.test_split)


# ------------------------------------------------------------------ cleaning
def _blank(value: object) -> bool:
    """Missing, NaN (pandas' empty cell) or only whitespace."""
    return value is None or (isinstance(value, float) and value != value) or not str(value).strip()


_OPERATORS = r"+\-*/×÷=^"


def normalize_text(text: str) -> str:
    """Lower-case, punctuation-free, single-spaced text for duplicate and overlap checks.

    Arithmetic operators stay, as words of their own: `What is 4 + 5?` and `what is 4+5`
    match, `What is 4 * 5?` does not.
    """
    text = re.sub(f"([{_OPERATORS}])", r" \1 ", text.lower())
    return re.sub(r"\s+", " ", re.sub(f"[^\\w\\s{_OPERATORS}]", " ", text)).strip()


def clean(rows: list[dict]) -> tuple[list[dict], Counter, list[str]]:
    """Keep usable rows; count the others by reason; return a few examples of each problem."""
    kept, reasons, examples, seen = [], Counter(), [], set()
    for i, row in enumerate(rows):
        q, a = row.get("question"), row.get("answer")
        reason = None
        if _blank(q):
            reason = "empty_question"
        elif _blank(a):
            reason = "missing_answer"
        else:
            gold = extract_gold(str(a))
            if gold is None:
                reason = "non_numeric_answer"
            elif normalize_text(str(q)) in seen:
                reason = "duplicate"
        if reason:
            reasons[reason] += 1
            if len(examples) < 5:
                examples.append(f"row {i}: {reason}: question={str(q)[:60]!r} answer={str(a)[-40:]!r}")
            continue
        seen.add(normalize_text(str(q)))
        solution = worked_solution(str(a)) if _blank(row.get("solution")) else row["solution"]
        kept.append({"question": str(q).strip(), "gold": gold, "solution": str(solution)})
    return kept, reasons, examples


def overlap(train: list[dict], test: list[dict]) -> tuple[set[int], dict[str, int]]:
    """Indices of training rows whose question is also in the test split."""
    exact = {r["question"] for r in test}
    normal = {normalize_text(r["question"]) for r in test}
    hits, n_exact, n_norm = set(), 0, 0
    for i, r in enumerate(train):
        if r["question"] in exact:
            hits.add(i)
            n_exact += 1
        elif normalize_text(r["question"]) in normal:
            hits.add(i)
            n_norm += 1
    return hits, {"overlap_exact": n_exact, "overlap_normalized": n_norm}


def drop_long(rows: list[dict], max_chars: int | None) -> tuple[list[dict], list[str]]:
    """(rows whose question fits in max_chars, examples of those that do not)."""
    if max_chars is None:
        return rows, []
    kept, long = [], []
    for r in rows:
        (kept if len(r["question"]) <= max_chars else long).append(r)
    return kept, [f"{len(r['question'])} chars: {r['question'][:60]!r}..." for r in long]


# ------------------------------------------------------------------ splits
def build_splits(params: Params) -> tuple[dict[str, pd.DataFrame], dict]:
    p, fmt = params.prepare, params.project.answer_format.build()
    raw_train, raw_test = load_source(p, params.project.seed)
    train, train_bad, train_examples = clean(raw_train)
    test, test_bad, test_examples = clean(raw_test)
    if (train_bad or test_bad) and p.on_bad_rows == "fail":
        raise DataError("bad rows with prepare.on_bad_rows=fail: "
                        f"train {dict(train_bad)}, test {dict(test_bad)}; e.g. " + "; ".join(train_examples + test_examples))
    train, train_long = drop_long(train, p.max_question_chars)
    test, test_long = drop_long(test, p.max_question_chars)
    if train_long or test_long:
        msg = (f"{len(train_long)} training and {len(test_long)} test questions are longer than "
               f"prepare.max_question_chars={p.max_question_chars}; e.g. {(train_long + test_long)[0]}")
        if p.on_long_questions == "fail":
            raise DataError(msg + " and prepare.on_long_questions=fail")
        print(f"prepare: {msg}; dropped (prepare.on_long_questions=drop)")
    hits, overlap_counts = overlap(train, test)
    if hits:
        msg = f"{len(hits)} training questions also appear in the test split ({overlap_counts})"
        if p.on_contamination == "fail":
            raise DataError(msg + " and prepare.on_contamination=fail")
        print(f"prepare: {msg}; on_contamination={p.on_contamination}")
        if p.on_contamination == "drop":
            train = [r for i, r in enumerate(train) if i not in hits]
    if not train or not test:
        raise DataError(f"no usable rows left: train {len(train)}, test {len(test)} (bad rows: train {dict(train_bad)}, test {dict(test_bad)})")

    random.Random(params.project.seed).shuffle(train)
    n_sft = min(p.sft_examples, max(len(train) - 1, 0))
    warnings = []
    if n_sft < p.sft_examples:
        warnings.append(f"prepare.sft_examples is {p.sft_examples} but only {len(train)} training rows are left after "
                        f"cleaning: {n_sft} become SFT examples and {len(train) - n_sft} GRPO prompt(s)")
        print(f"prepare: warning: {warnings[-1]}")
    sft_rows, grpo_rows = train[:n_sft], train[n_sft:]
    if p.max_train_rows:
        grpo_rows = grpo_rows[: p.max_train_rows]
    if p.max_test_rows:
        test = test[: p.max_test_rows]

    def reasoning(r: dict) -> str:
        text = r["solution"]
        return text[: p.sft_max_reasoning_chars] if p.sft_max_reasoning_chars else text

    splits = {
        "grpo": pd.DataFrame({
            "prompt": [fmt.messages(r["question"]) for r in grpo_rows],
            "answer": [r["gold"] for r in grpo_rows],
            "question": [r["question"] for r in grpo_rows],
        }),
        "sft": pd.DataFrame({
            "prompt": [fmt.messages(r["question"]) for r in sft_rows],
            "completion": [[{"role": "assistant", "content": fmt.completion(reasoning(r), r["gold"])}] for r in sft_rows],
            "answer": [r["gold"] for r in sft_rows],
        }),
        "eval": pd.DataFrame({
            "question": [r["question"] for r in test],
            "answer": [r["gold"] for r in test],
        }),
    }
    metrics = {
        "source": p.source, "dataset": dataset_name(p),
        "rows_in_train": len(raw_train), "rows_in_test": len(raw_test),
        "rows_grpo": len(grpo_rows), "rows_sft": len(sft_rows), "rows_eval": len(test),
        "rows_train_clean": len(train) + (len(hits) if p.on_contamination == "drop" else 0),
        "dropped_train": dict(train_bad), "dropped_test": dict(test_bad),
        "too_long": {"train": len(train_long), "test": len(test_long), "max_question_chars": p.max_question_chars},
        "contamination": {**overlap_counts, "action": p.on_contamination},
        "warnings": warnings,
    }
    return splits, metrics


def run(params: Params, out_dir: Path) -> dict:
    splits, metrics = build_splits(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame.to_parquet(out_dir / f"{name}.parquet", index=False)
    return metrics


def main() -> None:
    params = load_params()
    with tracking.stage_run("prepare", params):
        metrics = run(params, path("prepared"))
        tracking.log_metrics(metrics)
    write_metrics("prepare", metrics)


if __name__ == "__main__":
    main()

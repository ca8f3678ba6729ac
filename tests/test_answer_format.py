"""The answer format (stages/common/answer_format.py): numbers, the parser, gold extraction, chat template.

Example tests pin the documented behaviour on literal strings; property tests (hypothesis)
check it over generated numbers and completions: the parser must never raise, and the
answer is only ever read from the last answer block.
"""
from __future__ import annotations

import re
from decimal import Decimal

import pandas as pd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from stages.common.answer_format import (
    DEFAULT_FORMAT,
    AnswerFormat,
    completion_text,
    extract_gold,
    last_number,
    normalize_number,
    parse,
    worked_solution,
)
from stages.common.models import base_info, load_tokenizer

F = DEFAULT_FORMAT
CANONICAL = re.compile(r"-?(0|[1-9]\d*)(\.\d*[1-9])?")  # what normalize_number returns


# ------------------------------------------------------------------ normalize_number: examples
@pytest.mark.parametrize("text, expected", [
    ("42", "42"), ("  42 ", "42"), ("042", "42"), ("1,234", "1234"), ("1,234,567", "1234567"),
    ("-5", "-5"), ("−5", "-5"), ("- 5", "-5"), ("3.50", "3.5"), ("3.0", "3"), ("0.0", "0"), ("-0", "0"),
    (".5", "0.5"), ("-.5", "-0.5"), ("1,000.50", "1000.5"), ("$12", "12"), ("$ 12", "12"), ("$1,234.00", "1234"),
    ("-$3", "-3"), ("$-3", "-3"), ("12.", "12"), ("12%", "12"), ("$5.", "5"),
    ("٤٢", "42"), ("-٤٢", "-42"), ("４２", "42"), ("１，２３４", "1234"), ("४२", "42"), ("٣٫٥", None),
    ("123456789012345678901234567890", "123456789012345678901234567890"),
    ("123456789012345678901234567890.25", "123456789012345678901234567890.25"),
    ("1" * 200, "1" * 200), ("-10000000000000000000000000001", "-10000000000000000000000000001"),
])
def test_normalize_number_accepts_how_people_write_numbers(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text", [
    None, "", " ", "abc", "1.2.3", "12,34", "1,2345", "1e5", "5 apples", "$", "-", ".", "4/5", "1 2", "--5", "NaN", "inf",
])
def test_normalize_number_rejects_what_is_not_one_number(text):
    assert normalize_number(text) is None


# ------------------------------------------------------------------ normalize_number: properties
DIGIT_SETS = {
    "ascii": "0123456789",
    "arabic-indic": "٠١٢٣٤٥٦٧٨٩",
    "full-width": "０１２３４５６７８９",
    "devanagari": "०१२३४५६७८९",
}


@st.composite
def written_integers(draw) -> tuple[int, str]:
    """An integer and one way a person or a model might write it."""
    n = draw(st.integers(min_value=-10**40, max_value=10**40))
    body = f"{abs(n):,}" if draw(st.booleans()) else str(abs(n))
    body = body.translate(str.maketrans("0123456789", draw(st.sampled_from(sorted(DIGIT_SETS.values())))))
    body += draw(st.sampled_from(["", ".0", ".00"]))
    dollar = "$" if draw(st.booleans()) else ""
    minus = draw(st.sampled_from(["-", "−"])) if n < 0 else ""
    text = draw(st.sampled_from([minus + dollar + body, dollar + minus + body])) if n < 0 else dollar + body
    text += draw(st.sampled_from(["", ".", "%"]))
    pad = draw(st.sampled_from(["", " ", "\t"]))
    return n, pad + text + pad


@given(written_integers())
@example((1234, "1,234")).via("the GSM8K style")
@example((-5, "$-5.")).via("sign after the currency, trailing full stop")
@example((42, "٤٢")).via("Arabic-Indic digits")
@example((-(10**28) - 1, str(-(10**28) - 1))).via("negating a Decimal rounds to 28 digits")
def test_every_written_form_of_an_integer_normalizes_to_it(case):
    n, text = case
    assert normalize_number(text) == str(n)


_decimals = st.integers(0, 8).flatmap(
    lambda places: st.decimals(min_value=-10**12, max_value=10**12, places=places, allow_nan=False, allow_infinity=False))


@given(_decimals)
def test_decimals_round_trip_exactly(value):
    text = format(value, "f")
    out = normalize_number(text)
    assert out is not None and Decimal(out) == value
    assert CANONICAL.fullmatch(out), out
    assert normalize_number(out) == out  # canonical form is a fixed point


@given(st.text())
@example("٣٫٥ ² ½ ①").via("non-decimal unicode digits")
def test_normalize_number_never_raises_and_is_canonical(text):
    out = normalize_number(text)
    assert out is None or CANONICAL.fullmatch(out), out


# ------------------------------------------------------------------ last_number
@pytest.mark.parametrize("text, expected", [
    ("So she has 1,234 apples. Then 5 more: 1,239.", "1239"),
    ("costs $3.50 each", "3.5"),
    ("no numbers here", None),
    ("٤٢ is the answer", "42"),
    ("temperature fell to -7 degrees", "-7"),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


# ------------------------------------------------------------------ parse: examples
def test_parse_a_well_formed_completion():
    p = parse("<think> 2 + 3 = 5 </think><SOLUTION> 5 </SOLUTION>")
    assert p.well_formed and not p.text_after_final
    assert p.answer_blocks == (" 5 ",) and p.answer == "5"
    assert p.reasoning == " 2 + 3 = 5 "
    assert (p.strict, p.lenient) == ("5", "5")


def test_parse_when_the_reasoning_tag_was_in_the_prompt():
    # The generation prompt ends with <think>, so the model's text starts inside the reasoning.
    p = parse("2 + 3 = 5</think>\n<SOLUTION>5</SOLUTION>\n")
    assert p.well_formed and p.reasoning == "2 + 3 = 5" and p.strict == "5"


def test_parse_without_tags_only_has_the_lenient_answer():
    p = parse("The answer is 1,234.")
    assert p.answer_blocks == () and p.answer is None and p.reasoning is None
    assert p.strict is None and p.lenient == "1234"
    assert not p.well_formed and not p.text_after_final


def test_parse_reads_the_answer_from_the_last_block():
    p = parse("<think>x</think><SOLUTION>1</SOLUTION><SOLUTION>2</SOLUTION>")
    assert p.answer_blocks == ("1", "2") and p.answer == "2" and p.strict == "2"
    assert not p.well_formed


def test_parse_reads_the_last_well_formed_block_after_an_unclosed_one():
    # Issue 13: the non-greedy match used to span both opening tags and read "20</think><SOLUTION>2".
    p = parse("<think>so<SOLUTION>20</think><SOLUTION>2</SOLUTION>")
    assert p.strict == "2" and p.answer_blocks == ("2",)
    assert not p.well_formed


def test_parse_with_answer_tags_inside_the_reasoning():
    p = parse("<think>maybe <SOLUTION>5</SOLUTION> no</think><SOLUTION>7</SOLUTION>")
    assert p.strict == "7" and p.answer_blocks == ("5", "7")
    assert not p.well_formed


def test_parse_flags_text_after_the_final_tag():
    p = parse("<think>x</think><SOLUTION>7</SOLUTION> and that is final, 8")
    assert p.text_after_final and not p.well_formed
    assert p.strict == "7" and p.lenient == "8"
    assert not parse("<think>x</think><SOLUTION>7</SOLUTION> \n ").text_after_final


def test_parse_empty_reasoning():
    p = parse("<think></think><SOLUTION>7</SOLUTION>")
    assert p.reasoning == "" and p.strict == "7" and p.well_formed


@pytest.mark.parametrize("text, strict", [
    ("<think>x</think><SOLUTION>7", None),  # answer block never closed
    ("<think>x<SOLUTION>7</SOLUTION>", "7"),  # reasoning never closed
    ("<think>x</think>7</SOLUTION>", None),  # answer block never opened
])
def test_parse_unclosed_tags(text, strict):
    p = parse(text)
    assert p.strict == strict and p.lenient == "7"
    assert not p.well_formed


def test_parse_non_numeric_answer_block():
    p = parse("<think>x</think><SOLUTION>seven</SOLUTION>")
    assert p.answer == "seven" and p.strict is None and p.well_formed


@pytest.mark.parametrize("completion", ["", [], [{"role": "assistant", "content": ""}], {"content": None}])
def test_parse_empty_completions(completion):
    p = parse(completion)
    assert p.answer_blocks == () and p.strict is None and p.lenient is None
    assert p.reasoning is None and not p.well_formed and not p.text_after_final


def test_parse_chat_form_reads_the_last_message():
    chat = [{"role": "assistant", "content": "<think>x</think><SOLUTION>9</SOLUTION>"}]
    assert parse(chat).strict == "9" and parse(chat).well_formed
    assert completion_text({"role": "assistant", "content": "hi"}) == "hi"


def test_completion_text_rejects_other_types():
    with pytest.raises(TypeError, match="unsupported completion type: int"):
        completion_text(42)


@pytest.mark.parametrize("text, well_formed", [
    ("<think>a</think><SOLUTION>1</SOLUTION>", True),
    ("  <think>a</think>  <SOLUTION>1</SOLUTION>  ", True),
    ("a</think><SOLUTION>1</SOLUTION>", True),
    ("<think>a</think>between<SOLUTION>1</SOLUTION>", False),
    ("preamble <think>a</think><SOLUTION>1</SOLUTION>", False),
    ("<think>a<think>b</think><SOLUTION>1</SOLUTION>", False),
    ("<think>a</think></think><SOLUTION>1</SOLUTION>", False),
    ("<SOLUTION>1</SOLUTION>", False),
    ("<think>a</think><SOLUTION>1</SOLUTION>x", False),
    ("<think>a</think>", False),
])
def test_well_formed(text, well_formed):
    assert parse(text).well_formed is well_formed


# ------------------------------------------------------------------ parse: properties
_PIECES = [F.reasoning_start, F.reasoning_end, F.solution_start, F.solution_end, "42", "-3.5", "1,000", " ", "\n", "x", "<", ">"]


@given(st.one_of(st.text(), st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)))
def test_parse_never_raises_and_fields_agree(text):
    p = parse(text)
    assert p.strict == (normalize_number(p.answer_blocks[-1]) if p.answer_blocks else None)
    assert p.answer == (p.answer_blocks[-1].strip() if p.answer_blocks else None)
    assert p.lenient == last_number(text)
    if p.well_formed:
        assert len(p.answer_blocks) == 1 and p.reasoning is not None and not p.text_after_final
    if not p.answer_blocks:
        assert not p.text_after_final


_plain = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=80)


@given(prefix=st.one_of(st.text(), st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)),
       n=st.integers(-10**9, 10**9), tail=st.sampled_from(["", " ", "\n"]))
@example(prefix="<think>so<SOLUTION>20</think>", n=2, tail="").via("an unclosed block before the last one")
@example(prefix="<SOLUTION><SOLUTION>", n=7, tail="\n").via("two unclosed opening tags")
def test_the_last_well_formed_block_is_the_answer_whatever_comes_before(prefix, n, tail):
    p = parse(f"{prefix}{F.solution_start}{n}{F.solution_end}{tail}")
    assert p.strict == str(n) and p.answer_blocks[-1] == str(n)
    assert not p.text_after_final


@given(reasoning=_plain, n=st.integers(-10**9, 10**9), inside=st.booleans())
def test_formatted_completions_parse_back(reasoning, n, inside):
    text = F.completion(reasoning, str(n))
    if inside:  # as generated after the template's reasoning tag
        text = text.removeprefix(F.reasoning_start)
    p = parse(text)
    assert p.well_formed and p.strict == str(n) and p.reasoning == reasoning.strip()


# ------------------------------------------------------------------ configurable tags
def test_configurable_tags():
    fmt = AnswerFormat(reasoning_start="<reasoning>", reasoning_end="</reasoning>",
                       solution_start="<answer>", solution_end="</answer>")
    text = fmt.completion("6 * 7 = 42", "42")
    assert text == "<reasoning>6 * 7 = 42</reasoning><answer>42</answer>"
    p = parse(text, fmt)
    assert p.well_formed and p.strict == "42" and p.reasoning == "6 * 7 = 42"
    assert "<reasoning>" in fmt.system_prompt and "</answer>" in fmt.system_prompt
    assert parse(text).answer_blocks == ()  # the default tags do not see these blocks
    assert parse(F.completion("r", "1"), fmt).answer_blocks == ()


def test_tags_with_regex_characters_are_literal():
    fmt = AnswerFormat(reasoning_start="[[", reasoning_end="]]", solution_start="(*", solution_end="*)")
    p = parse("[[a.b]](* 3 *)", fmt)
    assert p.well_formed and p.strict == "3" and p.reasoning == "a.b"


def test_messages_are_system_then_user():
    msgs = F.messages("  What is 2 + 2?\n")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == F.system_prompt and msgs[1]["content"] == "What is 2 + 2?"


# ------------------------------------------------------------------ GSM8K gold answers
@pytest.mark.parametrize("answer, gold", [
    ("She pays 2 * 617 = <<2*617=1234>>1234.\n#### 1,234", "1234"),
    ("It drops 5.\n#### -5", "-5"),
    ("#### 3.50", "3.5"),
    ("#### $12", "12"),
    ("#### 12.", "12"),
    ("42", "42"),
    ("a #### 1 #### 2", "2"),
    ("#### abc", None),
    ("no final answer", None),
    (None, None),
])
def test_extract_gold(answer, gold):
    assert extract_gold(answer) == gold


def test_worked_solution_strips_calculator_notes_and_the_final_answer():
    answer = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72")
    assert worked_solution(answer) == ("Natalia sold 48/2 = 24 clips in May.\n"
                                       "Natalia sold 48+24 = 72 clips altogether.")
    assert worked_solution("just text") == "just text"


def test_every_shipped_gsm8k_answer_has_a_gold_number():
    from stages.common.paths import path

    for split in ("train", "test"):
        frame = pd.read_json(path("gsm8k") / f"{split}.jsonl", lines=True, dtype=False)
        golds = frame["answer"].map(extract_gold)
        assert golds.notna().all(), frame["answer"][golds.isna()].head().tolist()
        assert not frame["answer"].map(worked_solution).str.contains("<<|####", regex=True).any()


# ------------------------------------------------------------------ chat template (real tiny tokenizer)
@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return load_tokenizer(base_info(base_dir)["tokenizer"])


def _ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def test_generation_prompt_ends_inside_the_reasoning_tag(tokenizer):
    prompt = tokenizer.apply_chat_template(F.messages("What is 2 + 3?"), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(F.reasoning_start)
    assert F.system_prompt in prompt and "What is 2 + 3?" in prompt
    no_gen = tokenizer.apply_chat_template(F.messages("What is 2 + 3?"), tokenize=False, add_generation_prompt=False)
    assert not no_gen.endswith(F.reasoning_start)


def test_prompt_plus_completion_is_the_full_conversation(tokenizer):
    messages = F.messages("What is 2 + 3?")
    completion = F.completion("2 + 3 = 5", "5")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    # The completion starts with the reasoning tag the prompt already ends with.
    assert full == prompt + completion.removeprefix(F.reasoning_start) + tokenizer.eos_token
    assert parse(full[len(prompt):]).strict == "5"


def test_prompt_tokens_are_a_prefix_of_the_conversation_tokens(tokenizer, prepared_dir):
    """What TRL's SFT trainer checks: otherwise it trains on a context that differs from inference."""
    sft = pd.read_parquet(prepared_dir / "sft.parquet").head(50)
    for prompt, completion in zip(sft["prompt"], sft["completion"]):
        prompt, completion = list(prompt), list(completion)
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _ids(tokenizer, prompt + completion)
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[-1] == tokenizer.eos_token_id


def test_tags_are_single_tokens(tokenizer):
    for tag in (F.reasoning_start, F.reasoning_end, F.solution_start, F.solution_end):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag

"""The answer format, in one place: tags, system prompt, chat template and the parser.

SFT formatting, the rewards and the evaluation task all import from here, so the format
the model is trained on and the format it is scored on cannot drift apart.

A completion looks like `<think> working </think><SOLUTION> 42 </SOLUTION>`. The chat
template for base models ends its generation prompt with the reasoning tag, so the model's
own text usually starts inside the reasoning block; the parser accepts both forms.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation


@dataclass(frozen=True)
class AnswerFormat:
    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"
    solution_start: str = "<SOLUTION>"
    solution_end: str = "</SOLUTION>"
    # None: the default instructions below; "": no system message at all.
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.system_prompt is None:
            default = (
                "Solve the problem. Write your step-by-step reasoning between "
                f"{self.reasoning_start} and {self.reasoning_end}, then give only the final "
                f"number between {self.solution_start} and {self.solution_end}."
            )
            object.__setattr__(self, "system_prompt", default)

    def completion(self, reasoning: str, answer: str) -> str:
        """The assistant text the model should produce (used for SFT targets)."""
        return (
            f"{self.reasoning_start}{reasoning.strip()}{self.reasoning_end}"
            f"{self.solution_start}{answer.strip()}{self.solution_end}"
        )

    def chat_template(self, eos_token: str) -> str:
        """A Jinja chat template for base models that lack one.

        The generation prompt ends with the reasoning tag, so generation starts inside it.
        An assistant turn in training data is rendered whole (it begins with that same tag),
        so `prompt + completion` renders exactly as the full conversation does.
        """
        start = self.reasoning_start
        return (
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
            "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\n\\nAnswer: ' }}"
            "{% elif message['role'] == 'assistant' %}"
            "{{ message['content'] + '" + eos_token + "' }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + start + "' }}{% endif %}"
        )

    def messages(self, question: str) -> list[dict[str, str]]:
        """The prompt as chat messages: system prompt (if any), then the question."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": question.strip()}]


DEFAULT_FORMAT = AnswerFormat()

# A number as people write it: optional sign and currency, digit groups, decimals.
_NUMBER = re.compile(r"[-−]?\s*\$?\s*\d[\d,]*(?:\.\d+)?|[-−]?\s*\$?\s*\.\d+")


def _ascii_digits(text: str) -> str:
    """Map any Unicode decimal digit (Arabic-Indic, full-width, ...) to its ASCII digit."""
    if text.isascii():
        return text
    out = []
    for ch in text:
        digit = unicodedata.decimal(ch, None)
        out.append(str(digit) if digit is not None and not ch.isascii() else ch)
    return unicodedata.normalize("NFKC", "".join(out))


def normalize_number(text: str | None) -> str | None:
    """Canonical string for a number written as text, or None if it is not one number.

    Accepts commas as thousands separators, a leading `$`, a trailing `.` or `%`, a minus
    sign (ASCII or Unicode) and Unicode digits. `1,000.50` -> `1000.5`, `$-3` -> `-3`.
    """
    if text is None:
        return None
    s = _ascii_digits(text).strip().replace("−", "-")
    s = s.rstrip(".").rstrip("%").strip()
    negative = False
    if s.startswith("-"):
        negative, s = True, s[1:].strip()
    if s.startswith("$"):
        s = s[1:].strip()
    if s.startswith("-") and not negative:
        negative, s = True, s[1:].strip()
    if not re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?|\d+(\.\d+)?|\.\d+", s):
        return None
    try:
        # The sign goes into the string: Decimal() is exact, arithmetic (-value) rounds to 28 digits.
        value = Decimal(("-" if negative else "") + s.replace(",", ""))
    except InvalidOperation:
        return None
    # int() and format() are exact at any size; quantize() and normalize() round to 28 digits too.
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f").rstrip("0")


def last_number(text: str) -> str | None:
    """The last number anywhere in the text, normalised (the lenient extraction)."""
    matches = _NUMBER.findall(_ascii_digits(text))
    for candidate in reversed(matches):
        value = normalize_number(candidate.replace(" ", ""))
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class Parsed:
    """What a completion contains, as far as the format is concerned."""

    answer_blocks: tuple[str, ...]  # contents of every complete answer block, in order
    reasoning: str | None  # contents of the reasoning block, None if there is none
    strict: str | None  # normalised number from the last answer block
    lenient: str | None  # normalised last number in the whole completion
    text_after_final: bool  # non-space text after the last closing answer tag
    well_formed: bool  # reasoning block, then exactly one answer block, nothing after

    @property
    def answer(self) -> str | None:
        """Raw text of the last answer block (where the answer is read from)."""
        return self.answer_blocks[-1].strip() if self.answer_blocks else None


def completion_text(completion: object) -> str:
    """Plain text of a completion, whether a string or TRL's chat form [{'content': ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and not completion:
        return ""
    if isinstance(completion, list) and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    raise TypeError(f"unsupported completion type: {type(completion).__name__}")


def parse(completion: object, fmt: AnswerFormat = DEFAULT_FORMAT) -> Parsed:
    """Parse a completion. The answer is only ever read from the last well-formed answer block:
    an opening tag, text without another opening tag, a closing tag."""
    text = completion_text(completion)
    # A block's content never holds another opening tag: in `<S>20</think><S>2</S>` the block is `2`,
    # so an unclosed opening tag before the last block cannot swallow it.
    start = re.escape(fmt.solution_start)
    sol = re.compile(start + r"((?:(?!" + start + r").)*?)" + re.escape(fmt.solution_end), re.S)
    blocks = tuple(m.group(1) for m in sol.finditer(text))
    # The reasoning block may open in the prompt, so its start tag is optional.
    head = text.split(fmt.solution_start, 1)[0]
    reasoning = None
    if fmt.reasoning_end in head:
        before_end = head.split(fmt.reasoning_end, 1)[0]
        reasoning = before_end.split(fmt.reasoning_start)[-1]
    last_end = text.rfind(fmt.solution_end)
    text_after = bool(blocks) and bool(text[last_end + len(fmt.solution_end):].strip())
    strict = normalize_number(blocks[-1]) if blocks else None
    structure = re.compile(
        r"\s*(?:" + re.escape(fmt.reasoning_start) + r")?(?:(?!" + re.escape(fmt.reasoning_start)
        + r").)*?" + re.escape(fmt.reasoning_end) + r"\s*" + re.escape(fmt.solution_start)
        + r".*?" + re.escape(fmt.solution_end) + r"\s*",
        re.S,
    )
    well_formed = (
        len(blocks) == 1
        and structure.fullmatch(text) is not None
        and text.count(fmt.reasoning_end) == 1
        and text.count(fmt.solution_start) == 1
    )
    return Parsed(
        answer_blocks=blocks,
        reasoning=reasoning,
        strict=strict,
        lenient=last_number(text),
        text_after_final=text_after,
        well_formed=well_formed,
    )


def extract_gold(answer_field: str) -> str | None:
    """Gold final answer from a GSM8K-style answer (`... #### 1,234`), normalised."""
    if answer_field is None:
        return None
    text = str(answer_field)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return normalize_number(text)


def worked_solution(answer_field: str) -> str:
    """The reasoning part of a GSM8K answer: the text before `####`, calculator notes removed."""
    text = str(answer_field).rsplit("####", 1)[0]
    return re.sub(r"<<[^>]*>>", "", text).strip()

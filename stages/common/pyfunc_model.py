"""The registered model as MLflow serves it: GSM8K questions in, completion and answer out.

    model = mlflow.pyfunc.load_model("models:/gsm8k-grpo@champion")
    model.predict(pd.DataFrame({"question": ["Tom has 3 apples ..."]}))
    # -> DataFrame with columns question, completion, answer (answer None when unparsable)

Input: a DataFrame with a `question` column, a list of questions, a dict {"question": ...}
or one string; over HTTP `{"dataframe_records": [{"question": ...}]}` or `{"inputs": [...]}`.

Why a pyfunc wrapper: MLflow 3 cannot register a bare artifact folder (it leaves an empty
registered name), and `mlflow.transformers` drags in torchvision. The wrapper's artifacts
are the model folders (`model`: a merged or fully fine-tuned model; or `adapter` plus
`base`, where `base` may instead be a hub id in model_config). Prompts use the project's
answer format (system prompt + chat template, generation starts inside the reasoning tag)
and answers are read by `answer_format.parse`, the parser training and evaluation use.

model_config keys (override at load time: `load_model(uri, model_config={...})`):
answer_format (the four tags), max_new_tokens, batch_size, dtype, base_model and
base_revision (hub id of the base when it is not an artifact), trust_remote_code.
`max_new_tokens` may also be passed per call as an inference param.

Only stdlib-importing project modules are used here (answer_format, models): the model's
code/ copy of `stages` has no dvc.yaml or params.yaml next to it.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

from stages.common.answer_format import AnswerFormat, parse

QUESTION = "question"


def as_questions(model_input: Any) -> list[str]:
    """The questions in a DataFrame (`question` column), a dict of lists, a list or a string."""
    if isinstance(model_input, pd.DataFrame):
        if QUESTION not in model_input.columns:
            raise ValueError(f"input DataFrame needs a {QUESTION!r} column; got columns {list(model_input.columns)}")
        questions = model_input[QUESTION].tolist()
    elif isinstance(model_input, dict):
        if QUESTION not in model_input:
            raise ValueError(f"input dict needs a {QUESTION!r} key; got keys {sorted(model_input)}")
        value = model_input[QUESTION]
        questions = [value] if isinstance(value, str) else list(value)
    elif isinstance(model_input, str):
        questions = [model_input]
    elif isinstance(model_input, (list, tuple)):
        questions = list(model_input)
    else:
        raise TypeError(f"unsupported input type {type(model_input).__name__}; "
                        f"pass a DataFrame with a {QUESTION!r} column, a dict, or a list of strings")
    bad = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if bad:
        raise ValueError(f"questions must be non-empty strings; rows {bad[:10]} are not")
    return questions


class GSM8KModel(mlflow.pyfunc.PythonModel):
    """Greedy generation in the trained answer format; one row per question."""

    def load_context(self, context) -> None:
        import torch

        from stages.common.models import load_causal_lm, load_tokenizer

        cfg = dict(context.model_config or {})
        artifacts = context.artifacts
        self.fmt = AnswerFormat(**cfg.get("answer_format", {}))
        self.max_new_tokens = int(cfg.get("max_new_tokens", 256))
        self.batch_size = int(cfg.get("batch_size", 8))
        dtype = cfg.get("dtype", "auto")
        trust = bool(cfg.get("trust_remote_code", False))
        if "model" in artifacts:
            model = load_causal_lm(artifacts["model"], dtype=dtype, trust_remote_code=trust)
            tokenizer_dir = artifacts["model"]
        elif "adapter" in artifacts:
            from peft import PeftModel

            base = artifacts.get("base") or cfg.get("base_model")
            if not base:
                raise ValueError("adapter model needs a `base` artifact or model_config['base_model']")
            revision = None if "base" in artifacts else cfg.get("base_revision")
            model = PeftModel.from_pretrained(
                load_causal_lm(base, dtype=dtype, revision=revision, trust_remote_code=trust), artifacts["adapter"])
            tokenizer_dir = artifacts["adapter"]
        else:
            raise ValueError(f"expected a `model` or `adapter` artifact; got {sorted(artifacts)}")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer_dir)
        # Batched generation of decoder-only models pads on the left.
        self.tokenizer.padding_side = "left"

    def prompt(self, question: str) -> str:
        return self.tokenizer.apply_chat_template(
            self.fmt.messages(question), tokenize=False, add_generation_prompt=True)

    def generate(self, questions: list[str], max_new_tokens: int) -> list[str]:
        import torch

        texts = [self.prompt(q) for q in questions]
        # The chat template already holds whatever special tokens the model expects.
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        questions = as_questions(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        completions: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            completions += self.generate(questions[start:start + self.batch_size], max_new_tokens)
        return pd.DataFrame({
            QUESTION: questions,
            "completion": completions,
            "answer": [parse(c, self.fmt).strict for c in completions],
        })


def signature(max_new_tokens: int):
    """Output question/completion/answer and the inference param max_new_tokens.

    No input schema: MLflow would then reject a plain list of questions before `predict`
    sees it; `as_questions` checks the input instead, with errors that name the problem.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", QUESTION), ColSpec("string", "completion"),
                        ColSpec("string", "answer", required=False)]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what is installed; explicit so MLflow never infers them (it would import torchvision)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "torch", "transformers", "peft", "accelerate", "sentencepiece", "pandas"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins

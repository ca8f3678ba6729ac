"""Stage `base_model`: resolve the base model, or build the tiny one.

    python -m stages.base_model       # reads params.yaml: project, model

- `model.name_or_path: tiny` trains a SentencePiece tokenizer on the prepared training text
  and builds a small random Llama (widths multiples of 256, so GGUF k-quants apply),
  deterministic from project.seed, saved in Hugging Face format with eos/pad and the
  answer-format chat template.
- A local folder or a hub id: the tokenizer is saved here (with the project chat template
  when model.chat_template asks for it) and base.json records where the weights are; a hub
  id is downloaded into the Hugging Face cache and pinned to the commit it resolved to.
"""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from stages.common import tracking
from stages.common.answer_format import AnswerFormat
from stages.common.models import BASE_INFO
from stages.common.params import ModelParams, Params, check_runtime, load_params
from stages.common.paths import path, write_metrics

SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def training_text(prepared: Path, fmt: AnswerFormat) -> list[str]:
    """Text the tiny tokenizer learns from: the training prompts and worked solutions."""
    lines = [fmt.system_prompt]
    grpo = pd.read_parquet(prepared / "grpo.parquet")
    lines += [str(q) for q in grpo["question"]] + [str(a) for a in grpo["answer"]]
    sft = pd.read_parquet(prepared / "sft.parquet")
    lines += [c[0]["content"] for c in sft["completion"]]
    return lines


def build_tokenizer(text: list[str], vocab_size: int, model_type: str, fmt: AnswerFormat, out: Path):
    """Train a SentencePiece model (byte fallback, split digits, tags as single tokens)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    # Trained from memory into memory: with file input the model records the (random) temp
    # paths, so two builds with the same seed would differ in bytes. num_threads is fixed
    # because the learned merges depend on it.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("\n", " ") for t in text]), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, split_digits=True, character_coverage=1.0,
        pad_id=SPECIAL["pad"], unk_id=SPECIAL["unk"], bos_id=SPECIAL["bos"], eos_id=SPECIAL["eos"],
        user_defined_symbols=[fmt.reasoning_start, fmt.reasoning_end, fmt.solution_start, fmt.solution_end],
        # A soft limit: a small corpus (synthetic arithmetic) supports fewer pieces than asked.
        hard_vocab_limit=False, minloglevel=2, num_threads=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    # transformers 5: construct through from_pretrained on a folder holding tokenizer.model;
    # LlamaTokenizer(vocab_file=...) silently yields a 4-token vocabulary.
    tok = LlamaTokenizer.from_pretrained(str(out), legacy=False, add_bos_token=False,
                                         bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = fmt.chat_template(tok.eos_token)
    return tok


def build_tiny(params: Params, prepared: Path, out: Path) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t = params.model.tiny
    fmt = params.project.answer_format.build()
    model_dir = out / "model"
    tok = build_tokenizer(training_text(prepared, fmt), t.vocab_size, t.tokenizer_model, fmt, model_dir)
    vocab = len(tok)
    # Round the embedding up to a multiple of 256 so every matrix width suits k-quants.
    padded_vocab = -(-vocab // 256) * 256
    # Every id the model can sample gets a token, as real tokenizers reserve theirs: vLLM turns each
    # sampled id into its token for the log-probs GRPO asks for, and an id without one crashed it
    # (a small corpus gives SentencePiece fewer pieces than asked: learn-gpu has 299 of 512 ids).
    tok.add_tokens([f"<reserved_{i}>" for i in range(vocab, padded_vocab)], special_tokens=True)
    config = LlamaConfig(
        vocab_size=padded_vocab, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(params.project.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {"model": "model", "tokenizer": "model", "revision": None, "kind": "tiny",
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": vocab}


def resolve_pretrained(m: ModelParams, fmt: AnswerFormat, out: Path) -> dict:
    """A hub id or local folder: save the tokenizer here, record where the weights are."""
    from transformers import AutoTokenizer

    source, revision = m.name_or_path, m.revision
    if not Path(source).exists():
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, revision=revision)
        revision = Path(local).name  # the commit the revision resolved to
    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=m.trust_remote_code)
    use_project = m.chat_template == "project" or (m.chat_template == "auto" and not tok.chat_template)
    if use_project:
        tok.chat_template = fmt.chat_template(tok.eos_token)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out / "tokenizer")
    return {"model": source, "tokenizer": "tokenizer", "revision": revision, "kind": "pretrained",
            "chat_template": "project" if use_project else "model"}


def run(params: Params, prepared: Path, out: Path) -> dict:
    check_runtime(params)
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    fmt = params.project.answer_format.build()
    if params.model.name_or_path == "tiny":
        info = build_tiny(params, prepared, out)
    else:
        info = resolve_pretrained(params.model, fmt, out)
    (out / BASE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    params = load_params()
    with tracking.stage_run("base_model", params, section="model"):
        metrics = run(params, path("prepared"), path("base_model"))
        tracking.log_metrics(metrics)
    write_metrics("base_model", metrics)


if __name__ == "__main__":
    main()

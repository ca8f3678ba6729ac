"""Stage base_model (stages/base_model.py): the tiny model loads, generates, chats, is
GGUF-friendly and deterministic; a local folder resolves without the hub.

The session fixture `base_dir` is one build; the tests here build more into tmp dirs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import base_model
from stages.common.answer_format import DEFAULT_FORMAT, AnswerFormat
from stages.common.models import BASE_INFO, base_info, load_base_model, load_tokenizer
from tests.conftest import tiny


@pytest.fixture(scope="module")
def tok(base_dir):
    return load_tokenizer(base_info(base_dir)["tokenizer"])


@pytest.fixture(scope="module")
def model(base_dir):
    return load_base_model(base_dir).eval()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(base_info(out)["model"]) / "model.safetensors"))


def test_base_json_says_where_things_are(base_dir, tiny_params):
    info = json.loads((base_dir / BASE_INFO).read_text())
    assert info["kind"] == "tiny" and info["revision"] is None
    assert info["vocab_size"] == tiny_params.model.tiny.vocab_size
    assert 1_000_000 < info["parameters"] < 10_000_000
    resolved = base_info(base_dir)
    assert Path(resolved["model"]).is_dir() and Path(resolved["tokenizer"]).is_dir()


def test_loads_as_a_causal_lm_and_generates(tok, model):
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    inputs = tok.apply_chat_template(DEFAULT_FORMAT.messages("What is 2 + 3?"), add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6) or out[0, -1] == tok.eos_token_id
    assert isinstance(tok.decode(out[0, inputs["input_ids"].shape[1]:]), str)


def test_special_tokens_are_set(tok, model):
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert tok.pad_token_id != tok.eos_token_id  # padding must not be mistaken for the end of an answer
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_chat_template_is_the_answer_format(tok):
    assert tok.chat_template == DEFAULT_FORMAT.chat_template(tok.eos_token)
    prompt = tok.apply_chat_template(DEFAULT_FORMAT.messages("Q?"), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(DEFAULT_FORMAT.reasoning_start)


def test_widths_suit_llama_cpp_k_quants(model, tiny_params):
    cfg = model.config
    assert cfg.hidden_size % 256 == 0 and cfg.intermediate_size % 256 == 0 and cfg.vocab_size % 256 == 0
    assert (cfg.hidden_size, cfg.intermediate_size) == (tiny_params.model.tiny.hidden_size, tiny_params.model.tiny.intermediate_size)
    for name, weight in model.named_parameters():
        if weight.dim() == 2:
            assert weight.shape[0] % 256 == 0 and weight.shape[1] % 256 == 0, (name, tuple(weight.shape))


def test_tokenizer_model_is_saved_beside_the_weights(base_dir):
    folder = Path(base_info(base_dir)["model"])
    assert (folder / "tokenizer.model").stat().st_size > 10_000
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def test_tokenizer_splits_digits_and_keeps_tags_whole(tok):
    assert [t.strip("▁") for t in tok.tokenize("1234") if t.strip("▁")] == ["1", "2", "3", "4"]
    for tag in (DEFAULT_FORMAT.reasoning_start, DEFAULT_FORMAT.solution_end):
        assert tok.tokenize(tag) == [tag]
    text = "Ünïcode ٤٢ ✓ $1,234.50"  # byte fallback: nothing becomes <unk>
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_same_seed_same_model(base_dir, tiny_params, prepared_dir, tmp_path):
    metrics = base_model.run(tiny_params, prepared_dir, tmp_path / "again")
    print(f"tiny build: {metrics['seconds']} s")  # the budget is 30 s on 2 cores
    first, second = _weights(base_dir), _weights(tmp_path / "again")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    model_dir = Path(base_info(base_dir)["model"])
    assert (model_dir / "tokenizer.model").read_bytes() == (tmp_path / "again" / "model" / "tokenizer.model").read_bytes()


def test_other_seed_and_tags_give_another_model(base_dir, prepared_dir, tmp_path):
    params = tiny({"project": {"seed": 1, "answer_format": {
        "reasoning_start": "<reasoning>", "reasoning_end": "</reasoning>", "solution_start": "<answer>", "solution_end": "</answer>"}}})
    base_model.run(params, prepared_dir, tmp_path / "other")
    first, other = _weights(base_dir), _weights(tmp_path / "other")
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])
    tok = load_tokenizer(base_info(tmp_path / "other")["tokenizer"])
    fmt = AnswerFormat(**params.project.answer_format.model_dump())
    assert tok.apply_chat_template(fmt.messages("Q?"), tokenize=False, add_generation_prompt=True).endswith("<reasoning>")
    assert tok.tokenize("<answer>") == ["<answer>"]



def test_every_embedding_row_has_a_token_when_the_corpus_is_small(tmp_path):
    """A synthetic corpus gives SentencePiece fewer pieces than asked (learn-gpu: 299 of 384); the rows up to the
    padded vocabulary get reserved tokens, since vLLM turns every sampled id into its token and crashed on
    ids without one (H200, 2026-11-30). Ordinary text tokenizes as before."""
    from stages import prepare

    params = tiny({"prepare": {"source": "synthetic", "synthetic": {"train_size": 200, "test_size": 20}},
                   "model": {"tiny": {"vocab_size": 384}}})
    prepare.run(params, tmp_path / "prepared")
    base_model.run(params, tmp_path / "prepared", tmp_path / "base")
    tok = load_tokenizer(base_info(tmp_path / "base")["tokenizer"])
    rows = load_base_model(tmp_path / "base").config.vocab_size
    pieces = base_info(tmp_path / "base")["vocab_size"]
    assert pieces < rows and rows % 256 == 0
    tokens = tok.convert_ids_to_tokens(list(range(rows)))
    assert None not in tokens and tokens[-1] == f"<reserved_{rows - 1}>"
    ids = tok("12 + 30 = <SOLUTION>42</SOLUTION>").input_ids
    assert max(ids) < pieces and tok.decode(ids + [rows - 1], skip_special_tokens=True) == tok.decode(ids)

@pytest.mark.parametrize("chat_template, expected", [("model", "model"), ("project", "project"), ("auto", "model")])
def test_a_local_folder_resolves_without_the_hub(base_dir, prepared_dir, tmp_path, chat_template, expected):
    local = base_info(base_dir)["model"]
    params = tiny({"model": {"name_or_path": local, "chat_template": chat_template}})
    metrics = base_model.run(params, prepared_dir, tmp_path / "base")
    info = base_info(tmp_path / "base")
    assert (metrics["kind"], metrics["chat_template"]) == ("pretrained", expected)
    assert info["model"] == local and Path(info["tokenizer"]).is_dir()
    tok = load_tokenizer(info["tokenizer"])
    assert tok.pad_token is not None and tok.chat_template
    model = load_base_model(tmp_path / "base")
    assert model.config.hidden_size == 256

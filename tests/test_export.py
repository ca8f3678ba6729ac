"""The export stages on the tiny model: merge (with its adapter check) and GGUF (real llama.cpp).

The GRPO output is stood in for by a LoRA adapter on the tiny base whose B matrices are
randomised: a fresh adapter has B = 0 and would not change the model, so a merge that drops
it would go unnoticed. The GGUF tests run llama.cpp's real converter, fetched from the pinned
llama-cpp-python sdist by scripts/fetch_llama_cpp.sh (PyPI on first run, then cached).

A random model's answers say little about quantization, so the numbers are checked on a model
that learned something: the `learn` preset's 2-digit addition at widths of 256 (llama.cpp's
k-quants need them), SFT-trained (full fine-tuning) on 64 problems until it knows most of them,
scored on those problems. It answers in about 18 tokens and stops at EOS.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages import gguf, merge
from stages.common import models
from stages.common.answer_format import AnswerFormat

TAGS = ["<think>", "</think>", "<SOLUTION>", "</SOLUTION>"]


@pytest.fixture(scope="module")
def grpo_dir(tmp_path_factory, tiny_params, base_dir) -> Path:
    """A LoRA adapter on the tiny base that visibly changes its outputs, saved as the grpo stage does."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = tiny_params.model.lora
    model = get_peft_model(models.load_base_model(base_dir, dtype="float32"), LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("grpo") / "grpo"
    model.save_pretrained(str(out))
    models.load_tokenizer(models.base_info(base_dir)["tokenizer"]).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_params, base_dir, grpo_dir, prepared_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged") / "merged"
    metrics = merge.run(tiny_params, base_dir, grpo_dir, prepared_dir / "eval.parquet", out)
    return out, metrics


# ------------------------------------------------------------------ merge
def test_merge_reproduces_base_plus_adapter(merged, tiny_params):
    out, metrics = merged
    check = metrics["check"]
    assert check["passed"] and check["tokens_equal"]
    assert check["max_logit_diff"] <= tiny_params.merge.atol
    assert 0 < check["tokens_compared"] <= tiny_params.merge.check_prompts * tiny_params.merge.check_tokens
    assert metrics["input"] == "adapter" and metrics["dtype"] == "float16"
    assert metrics["bytes"] == (out / "model.safetensors").stat().st_size > 0


def test_merged_folder_is_a_complete_16bit_model(merged, base_dir):
    from safetensors import safe_open

    out, _ = merged
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).exists(), name
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        base = safe_open(str(Path(models.base_info(base_dir)["model"]) / "model.safetensors"), "pt")
        key = "model.layers.0.self_attn.q_proj.weight"
        weight = f.get_tensor(key)
        assert str(weight.dtype) == "torch.float16"
        assert (weight.float() - base.get_tensor(key).float()).abs().max() > 1e-3  # the adapter is in it
    tokenizer = models.load_tokenizer(out)
    reference = models.load_tokenizer(models.base_info(base_dir)["tokenizer"])
    text = "Question: 12 eggs <think> 3 + 4 = 7 </think><SOLUTION>7</SOLUTION>"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.chat_template == reference.chat_template


def test_merged_tokenizer_config_tells_llama_cpp_about_added_tokens(merged):
    config = json.loads((merged[0] / "tokenizer_config.json").read_text())
    added = {v["content"]: v["special"] for v in config["added_tokens_decoder"].values()}
    assert all(added[tag] is False for tag in TAGS)  # answer tags: whole tokens, printed in output
    assert added["</s>"] is True
    assert config["add_bos_token"] is False and config["add_eos_token"] is False


def test_a_merge_that_drops_the_adapter_fails_the_check(monkeypatch, tmp_path, tiny_params, base_dir, grpo_dir,
                                                         prepared_dir):
    def save_base_only(base, adapter, dtype, out, trust_remote_code=False):
        models.load_base_model(base, dtype="float32").to(dtype).save_pretrained(str(out))

    monkeypatch.setattr(merge, "merge_peft", save_base_only)
    with pytest.raises(merge.MergeCheckError, match="dropped the adapter"):
        merge.run(tiny_params, base_dir, grpo_dir, prepared_dir / "eval.parquet", tmp_path / "merged")


def test_a_full_model_is_resaved_and_checked(merged, tmp_path, tiny_params, base_dir, prepared_dir):
    full = tmp_path / "grpo_full"
    shutil.copytree(merged[0], full)  # what full fine-tuning leaves: a whole model folder
    metrics = merge.run(tiny_params, base_dir, full, prepared_dir / "eval.parquet", tmp_path / "merged")
    assert metrics["input"] == "full_model" and metrics["check"]["passed"]
    assert metrics["check"]["max_logit_diff"] == 0.0


def test_merge_names_a_missing_grpo_output(tmp_path, tiny_params, base_dir, prepared_dir):
    with pytest.raises(FileNotFoundError, match="run the grpo stage"):
        merge.run(tiny_params, base_dir, tmp_path / "nothing", prepared_dir / "eval.parquet", tmp_path / "out")


# ------------------------------------------------------------------ gguf
@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_params, merged, prepared_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    return out, gguf.run(tiny_params, merged[0], prepared_dir / "eval.parquet", out)


@pytest.mark.slow
def test_gguf_files_load_generate_and_carry_the_chat_format(exported, tiny_params, merged):
    import llama_cpp

    out, metrics = exported
    assert set(metrics["files"]) == {"f16", "q8_0", "q4_k_m"}
    tokenizer = models.load_tokenizer(merged[0])
    for kind, record in metrics["files"].items():
        file = out / record["file"]
        assert record["bytes"] == file.stat().st_size > 0
        assert record["metadata"] == {"chat_template": True, "eos": True, "bos": True}
        assert record["questions"] == tiny_params.gguf.eval_questions and 0 <= record["accuracy"] <= 1
        assert record["tokens_per_second"] > 0 and record["chat_completion_tokens"] > 0
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=256, verbose=False)
        try:
            assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
            assert llm.token_eos() == tokenizer.eos_token_id and llm.token_bos() == tokenizer.bos_token_id
            # The answer tags are whole tokens with HF's ids, and come back as text.
            for tag in TAGS:
                assert llm.tokenize(tag.encode(), add_bos=False, special=True) == [tokenizer.convert_tokens_to_ids(tag)]
            assert llm.detokenize([tokenizer.convert_tokens_to_ids(t) for t in TAGS]).decode() == "".join(TAGS)
            out_text = llm.create_completion([5, 100, 200], max_tokens=8, temperature=0.0)
            assert out_text["usage"]["completion_tokens"] > 0
        finally:
            llm.close()
    assert 0 <= metrics["merged"]["accuracy"] <= 1 and metrics["merged"]["questions"] == tiny_params.gguf.eval_questions
    sizes = [metrics["files"][k]["bytes"] for k in ("f16", "q8_0", "q4_k_m")]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.slow
def test_gguf_metadata_check_catches_a_foreign_chat_template(exported, merged):
    import llama_cpp

    tokenizer = models.load_tokenizer(merged[0])
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    out, metrics = exported
    llm = llama_cpp.Llama(model_path=str(out / metrics["files"]["q8_0"]["file"]), n_ctx=128, verbose=False)
    try:
        with pytest.raises(gguf.GGUFCheckError, match="disagrees with the HF tokenizer"):
            gguf.check_metadata(llm, tokenizer)
    finally:
        llm.close()


@pytest.mark.slow
def test_gguf_tensor_types_are_the_requested_ones(exported):
    files = exported[1]["files"]
    assert files["f16"]["tensor_types"] == {"F16": 16, "F32": 5}
    assert files["q8_0"]["tensor_types"] == {"Q8_0": 16, "F32": 5}
    # Q4_K_M is a real k-quant mix on widths of 256: Q4_K, with Q6_K for output and some v/down matrices.
    q4 = files["q4_k_m"]["tensor_types"]
    assert set(q4) == {"Q4_K", "Q6_K", "F32"} and q4["Q4_K"] > q4["Q6_K"]
    assert exported[1]["type_mismatch"] == [] and not any(f["type_mismatch"] for f in files.values())


@pytest.mark.slow
def test_gguf_writes_an_ollama_modelfile_equivalent_to_the_chat_template(exported, merged, tiny_params):
    out, metrics = exported
    tokenizer = models.load_tokenizer(merged[0])
    fmt = AnswerFormat(**tiny_params.project.answer_format.model_dump())
    question = "What is 2 + 3?"
    expected = tokenizer.apply_chat_template(fmt.messages(question), tokenize=False, add_generation_prompt=True)
    for record in metrics["files"].values():
        text = (out / record["modelfile"]).read_text()
        assert f"FROM ./{record['file']}\n" in text
        template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
        assert system == fmt.system_prompt
        assert template.replace("{{ .System }}", system).replace("{{ .Prompt }}", question) == expected
        assert f'PARAMETER stop "{tokenizer.eos_token}"' in text and "PARAMETER temperature 0" in text


@pytest.mark.slow
def test_a_silently_replaced_k_quant_is_flagged(tmp_path, base_dir):
    """Width 288 is a multiple of 32 but not of 256: llama.cpp swaps Q4_K for Q5_0/Q8_0 without failing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = models.load_tokenizer(models.base_info(base_dir)["tokenizer"])
    folder = tmp_path / "odd"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=288, intermediate_size=512, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                     ).to(torch.float16).save_pretrained(str(folder))
    merge.save_tokenizer(tokenizer, base_dir, folder, folder)
    gguf.convert(gguf.fetch_converter(), folder, tmp_path / "odd-F16.gguf", "f16")
    gguf.quantize(tmp_path / "odd-F16.gguf", tmp_path / "odd-Q4_K_M.gguf", "q4_k_m")
    found = gguf.tensor_types(tmp_path / "odd-Q4_K_M.gguf", "q4_k_m")
    assert found["type_mismatch"]
    assert set(found["replaced_tensors"].values()) <= {"Q5_0", "Q8_0", "Q5_1", "Q4_0", "F16"}
    assert "token_embd.weight" in found["replaced_tensors"]


def test_gguf_names_a_missing_merged_model(tmp_path, tiny_params, prepared_dir):
    with pytest.raises(FileNotFoundError, match="run the merge stage"):
        gguf.run(tiny_params, tmp_path / "nothing", prepared_dir / "eval.parquet", tmp_path / "out")


def test_gguf_rejects_a_context_too_small_for_the_questions(tmp_path, merged, prepared_dir):
    from tests.conftest import tiny

    params = tiny({"gguf": {"n_ctx": 128, "max_new_tokens": 120}})
    with pytest.raises(ValueError, match="gguf.n_ctx"):
        gguf.run(params, merged[0], prepared_dir / "eval.parquet", tmp_path / "out")


# ------------------------------------------------------------------ a model that learned something
# learn's 2-digit addition at widths of 256 (k-quants need them), SFT on 64 problems until it knows
# them (about 37 passes each): 83% of them right when measured, each answer about 18 tokens then EOS.
# The merge check keeps the tiny preset's tolerances, the ones the issue saw fail.
LEARNED = {"prepare": {"synthetic": {"train_size": 400, "test_size": 50}, "sft_examples": 64},
           "model": {"tiny": {"hidden_size": 256, "intermediate_size": 512}},
           "sft": {"max_steps": 150, "per_device_train_batch_size": 16},
           "merge": {"check_prompts": 4, "check_tokens": 48, "atol": 2e-3, "rtol": 2e-3},
           "gguf": {"eval_questions": 24, "max_new_tokens": 24, "n_ctx": 256}}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """(params, the learned questions as an eval file, trained full model, merged folder, merge metrics)."""
    import pandas as pd

    from stages import base_model, prepare, sft
    from tests.conftest import tiny

    params = tiny(LEARNED, preset="learn")
    root = tmp_path_factory.mktemp("learned")
    prepare.run(params, root / "prepared")
    base_model.run(params, root / "prepared", root / "base")
    sft.run(params, root / "prepared" / "sft.parquet", root / "base", root / "trained")
    taught = pd.read_parquet(root / "prepared" / "sft.parquet")
    questions = root / "taught.parquet"
    pd.DataFrame({"question": [p[-1]["content"] for p in taught["prompt"]], "answer": taught["answer"]}
                 ).to_parquet(questions)
    merged = merge.run(params, root / "base", root / "trained", questions, root / "merged")
    return params, questions, root / "trained", root / "merged", merged


@pytest.mark.slow
def test_merge_check_passes_a_model_that_stops_at_eos_early(learned):
    """Issue 13: the reference used to be forced past EOS (min_new_tokens) while the candidate's own
    choice there was EOS, so a correct merge of a model that answers briefly failed the check (this
    model: tokens not equal, 4.1e-3 apart, under the old check; measured once, by hand)."""
    params, _, _, _, metrics = learned
    check = metrics["check"]
    assert check["passed"] and check["tokens_equal"] and check["logits_within"], check
    # The scenario: every continuation ended at EOS well before check_tokens.
    assert check["tokens_compared"] < params.merge.check_prompts * params.merge.check_tokens / 2, check
    assert metrics["input"] == "full_model" and check["max_logit_diff"] > 0


@pytest.mark.slow
def test_quantized_answers_track_the_merged_model(learned, tmp_path):
    params, questions, _, merged, _ = learned
    metrics = gguf.run(params, merged, questions, tmp_path / "gguf")
    assert metrics["merged"]["accuracy"] >= 0.5, f"the trained model learned too little to test: {metrics['merged']}"
    q8, q4 = metrics["files"]["q8_0"], metrics["files"]["q4_k_m"]
    assert q8["answers_equal_merged"] == 1.0 and q8["accuracy"] == metrics["merged"]["accuracy"]
    assert not q4["type_mismatch"] and set(q4["tensor_types"]) >= {"Q4_K"}
    assert q4["accuracy"] >= metrics["merged"]["accuracy"] - params.gguf.max_accuracy_drop
    assert metrics["quality_problems"] == []
    gguf.check_quality(metrics)


def test_quality_problems_name_the_file_and_the_limit():
    from tests.conftest import tiny

    g = tiny({"gguf": {"identical_answers": ["q8_0"], "max_accuracy_drop": 0.1}}).gguf
    files = {
        "q8_0": {"file": "m-Q8_0.gguf", "answers_equal_merged": 0.9, "answers_differing": 1, "questions": 10,
                 "accuracy": 0.5, "accuracy_delta_vs_merged": 0.0},
        "q4_k_m": {"file": "m-Q4_K_M.gguf", "answers_equal_merged": 0.5, "answers_differing": 5, "questions": 10,
                   "accuracy": 0.3, "accuracy_delta_vs_merged": -0.2},
        "f16": {"file": "m-F16.gguf", "answers_equal_merged": 0.9, "answers_differing": 1, "questions": 10,
                "accuracy": 0.4, "accuracy_delta_vs_merged": -0.1},
    }
    problems = gguf.quality_problems(files, g)
    assert problems == [
        "m-Q8_0.gguf: 1 of 10 extracted answers differ from the merged model's (gguf.identical_answers)",
        "m-Q4_K_M.gguf: accuracy 0.300 is 0.200 below the merged model's (gguf.max_accuracy_drop 0.1)"]
    with pytest.raises(gguf.GGUFCheckError, match="lose more than the params allow: m-Q8_0.gguf"):
        gguf.check_quality({"quality_problems": problems})

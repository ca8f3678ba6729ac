"""Stage `gguf`: convert the merged model to GGUF with llama.cpp's own tools, verify every file.

    python -m stages.gguf             # reads params.yaml: project, model, gguf

1. Convert: llama.cpp's `convert_hf_to_gguf.py`, vendored in the pinned llama-cpp-python
   sdist (scripts/fetch_llama_cpp.sh fetches it into .cache/; the stage calls it, a no-op once
   done), writes `gguf.outtype`. It runs with its own gguf-py: the gguf 0.19.0 wheel is older
   than the vendored copy despite the same version and the converter fails with it.
2. Quantize: llama.cpp's quantizer through the binding (`llama_cpp.llama_model_quantize`),
   one file per entry of `gguf.quantizations`.
3. Verify each file: llama.cpp loads it; its metadata holds the chat template and the HF
   tokenizer's bos/eos ids (else the stage fails); it answers `gguf.eval_questions` eval
   questions greedily, scored with answer_format.parse next to the merged HF model on the same
   token ids, so quantization loss is a number; one question also goes through llama.cpp's
   chat completion with the embedded template. The tensor types are read back from the file:
   llama.cpp silently replaces k-quants on matrices whose width is not a multiple of 256, so
   a requested type that was not delivered is flagged (`type_mismatch`), not assumed.
4. Check the numbers: every file in `gguf.identical_answers` (default q8_0) must give the merged
   model's extracted answer on every question, and no file may score more than
   `gguf.max_accuracy_drop` below it; otherwise GGUFCheckError, after every file was verified
   and its metrics written.
5. Write an Ollama Modelfile beside each file and print its `ollama create` command.

Deviation: accuracy prompts are the HF tokenizer's token ids fed to both engines. llama.cpp's
SentencePiece tokenizer puts a space after added tokens (the answer tags) where HF does not,
so text prompts may tokenize differently; `prompt_tokens_match` reports whether they do.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

from stages.common import models, tracking
from stages.common.answer_format import AnswerFormat, extract_gold, parse
from stages.common.params import ROOT, GGUFParams, Params, check_runtime, load_params
from stages.common.paths import path, write_metrics

FETCH_SCRIPT = ROOT / "scripts" / "fetch_llama_cpp.sh"

# llama.cpp file types (the quantizer's `ftype`) by params name.
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
          "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}  # a k-quant mix uses several of them by design
# Tensor types each requested file type may hold in its matrices (1-D norms stay F32).
EXPECTED_TYPES = {"f32": {"F32"}, "f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0"}, "q4_0": {"Q4_0"},
                  "q5_0": {"Q5_0"}, "q4_k_m": K_QUANTS, "q4_k_s": K_QUANTS, "q5_k_m": K_QUANTS, "q6_k": K_QUANTS}
# llama.cpp stores the output matrix in Q6_K (or Q8_0) for the 32-block types on purpose.
OUTPUT_EXTRA = {"Q6_K", "Q8_0"}


class GGUFCheckError(RuntimeError):
    """A GGUF file lacks what the trained model needs (chat template, special tokens), or quantization
    changed its answers more than the params allow."""


# ------------------------------------------------------------------ llama.cpp tools
def fetch_converter() -> Path:
    """Path of convert_hf_to_gguf.py, fetched by scripts/fetch_llama_cpp.sh when missing."""
    done = subprocess.run([str(FETCH_SCRIPT)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{FETCH_SCRIPT} failed (it needs PyPI for the llama-cpp-python sdist):\n{done.stderr[-2000:]}")
    converter = ROOT / done.stdout.strip().splitlines()[-1] / "convert_hf_to_gguf.py"
    if not converter.exists():
        raise RuntimeError(f"{FETCH_SCRIPT} finished but {converter} does not exist")
    return converter


def convert(converter: Path, merged: Path, outfile: Path, outtype: str) -> None:
    """HF folder -> GGUF with llama.cpp's converter, run with this Python and its vendored gguf-py."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    cmd = [sys.executable, str(converter), str(merged), "--outfile", str(outfile), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode or not outfile.exists():
        raise RuntimeError(f"llama.cpp's converter failed on {merged} ({' '.join(cmd)}):\n{done.stderr[-4000:]}")


def quantize(source: Path, target: Path, kind: str) -> None:
    """llama.cpp's quantizer (the library behind `llama-quantize`) through the Python binding."""
    import llama_cpp

    qparams = llama_cpp.llama_model_quantize_default_params()
    qparams.ftype = getattr(llama_cpp, FTYPES[kind])
    qparams.nthread = os.cpu_count() or 1
    qparams.allow_requantize = True  # only matters when gguf.outtype is itself quantized (q8_0)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(qparams)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")


def tensor_types(file: Path, requested: str) -> dict[str, Any]:
    """Histogram of the tensor types in the file and the matrices not in the requested type family."""
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    histogram = Counter(t.tensor_type.name for t in reader.tensors)
    expected = EXPECTED_TYPES[requested]
    replaced = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if len(t.shape) < 2 or kind in expected or (t.name == "output.weight" and kind in OUTPUT_EXTRA):
            continue
        replaced[t.name] = kind
    return {"requested": requested, "expected_types": sorted(expected), "tensor_types": dict(sorted(histogram.items())),
            "replaced_tensors": replaced, "type_mismatch": bool(replaced)}


# ------------------------------------------------------------------ verification
def questions(eval_file: Path, n: int) -> list[tuple[str, str]]:
    frame = pd.read_parquet(eval_file).head(n)
    if len(frame) < n:
        raise ValueError(f"{eval_file} has {len(frame)} rows; gguf.eval_questions wants {n}")
    return [(str(q), extract_gold(str(a))) for q, a in zip(frame["question"], frame["answer"])]


def prompt_ids(tokenizer, fmt: AnswerFormat, question: str) -> list[int]:
    """The chat-templated prompt as the HF tokenizer encodes it (what training saw)."""
    text = tokenizer.apply_chat_template(fmt.messages(question), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def score(completions: list[str], golds: list[str], fmt: AnswerFormat) -> dict[str, Any]:
    correct = sum(parse(c, fmt).strict == g for c, g in zip(completions, golds))
    return {"accuracy": correct / len(golds), "correct": correct, "questions": len(golds)}


def quality_problems(files: dict[str, dict], g: GGUFParams) -> list[str]:
    """What makes the exported files worse than the merged model beyond the params' limits."""
    problems = []
    for kind, record in files.items():
        if kind in g.identical_answers and record["answers_equal_merged"] < 1:
            problems.append(f"{record['file']}: {record['answers_differing']} of {record['questions']} extracted "
                            f"answers differ from the merged model's (gguf.identical_answers)")
        if -record["accuracy_delta_vs_merged"] > g.max_accuracy_drop + 1e-9:
            problems.append(f"{record['file']}: accuracy {record['accuracy']:.3f} is "
                            f"{-record['accuracy_delta_vs_merged']:.3f} below the merged model's "
                            f"(gguf.max_accuracy_drop {g.max_accuracy_drop})")
    return problems


def answer_hf(merged: Path, dtype: str, prompts: list[list[int]], max_new_tokens: int, tokenizer) -> dict[str, Any]:
    """Greedy answers of the merged HF model: the reference the GGUF files are measured against."""
    import torch

    model = models.load_causal_lm(merged, dtype=dtype).eval().to("cuda" if models.has_cuda() else "cpu")
    texts, tokens, start = [], 0, time.perf_counter()
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):]
        tokens += len(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return {"texts": texts, "tokens_per_second": tokens / (time.perf_counter() - start)}


def check_metadata(llm, tokenizer) -> dict[str, Any]:
    """Chat template and bos/eos ids in the GGUF must be the HF tokenizer's."""
    meta = llm.metadata
    found = {
        "chat_template": meta.get("tokenizer.chat_template") == tokenizer.chat_template,
        "eos": meta.get("tokenizer.ggml.eos_token_id") == str(tokenizer.eos_token_id),
        # Tokenizers without a BOS (Qwen) leave nothing to compare.
        "bos": tokenizer.bos_token_id is None or meta.get("tokenizer.ggml.bos_token_id") == str(tokenizer.bos_token_id),
    }
    if not all(found.values()):
        raise GGUFCheckError(
            f"GGUF metadata disagrees with the HF tokenizer ({found}): chat template present="
            f"{'tokenizer.chat_template' in meta}, eos {meta.get('tokenizer.ggml.eos_token_id')} vs {tokenizer.eos_token_id}, "
            f"bos {meta.get('tokenizer.ggml.bos_token_id')} vs {tokenizer.bos_token_id}")
    return found


def verify(file: Path, g: GGUFParams, tokenizer, fmt: AnswerFormat, prompts: list[list[int]],
           chat_question: str) -> dict[str, Any]:
    """Load in llama.cpp, check metadata, answer the prompts greedily (timed), then one chat question."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=g.n_ctx, verbose=False)
    load_seconds = time.perf_counter() - start
    try:
        metadata = check_metadata(llm, tokenizer)
        texts, tokens, start = [], 0, time.perf_counter()
        for ids in prompts:
            out = llm.create_completion(ids, max_tokens=g.max_new_tokens, temperature=0.0, repeat_penalty=1.0)
            texts.append(out["choices"][0]["text"])
            tokens += out["usage"]["completion_tokens"]
        tokens_per_second = tokens / (time.perf_counter() - start)
        # The path users take: llama.cpp renders the embedded template and tokenizes the text.
        rendered = tokenizer.apply_chat_template(fmt.messages(chat_question), tokenize=False, add_generation_prompt=True)
        chat = llm.create_chat_completion(fmt.messages(chat_question), max_tokens=g.max_new_tokens,
                                          temperature=0.0, repeat_penalty=1.0)
        llama_ids = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        prompt_match = llama_ids == prompt_ids(tokenizer, fmt, chat_question)
    finally:
        llm.close()
    return {"load_seconds": round(load_seconds, 3), "tokens_per_second": round(tokens_per_second, 1),
            "metadata": metadata, "texts": texts, "prompt_tokens_match": prompt_match,
            "chat_completion": chat["choices"][0]["message"]["content"],
            "chat_completion_tokens": chat["usage"]["completion_tokens"]}


# ------------------------------------------------------------------ Ollama
def ollama_template(tokenizer) -> str:
    """The chat template for one system + user turn, as an Ollama (Go) template.

    Rendered by the HF template itself with placeholders, so it cannot drift from it.
    """
    system, prompt = "@@OLLAMA_SYSTEM@@", "@@OLLAMA_PROMPT@@"
    text = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)
    if text.count(system) != 1 or text.count(prompt) != 1:
        raise ValueError("the chat template does not render the system prompt and the question once each; "
                         "cannot derive an Ollama TEMPLATE from it")
    text = text.replace("{{", '{{ "{{" }}')  # literal braces must not start Go actions
    return text.replace(system, "{{ .System }}").replace(prompt, "{{ .Prompt }}")


def ollama_tag(name: str, kind: str) -> str:
    return f"{name}:{kind}".lower()


def write_modelfile(gguf_file: Path, tokenizer, fmt: AnswerFormat, g: GGUFParams, tag: str) -> Path:
    modelfile = gguf_file.with_suffix(".Modelfile")
    modelfile.write_text(
        f"# Ollama Modelfile written by stages/gguf.py; greedy decoding as in evaluation.\n"
        f"#   ollama create {tag} -f {modelfile.name}\n"
        f"FROM ./{gguf_file.name}\n"
        f'TEMPLATE """{ollama_template(tokenizer)}"""\n'
        f'SYSTEM """{fmt.system_prompt}"""\n'
        f'PARAMETER stop "{tokenizer.eos_token}"\n'
        f"PARAMETER temperature 0\n"
        f"PARAMETER num_ctx {g.n_ctx}\n")
    return modelfile


# ------------------------------------------------------------------ stage
def gguf_name(project: str, kind: str) -> str:
    return f"{project}-{kind.upper()}.gguf"


def run(params: Params, merged: Path, eval_file: Path, out: Path) -> dict[str, Any]:
    check_runtime(params)
    g, start = params.gguf, time.perf_counter()
    if not (merged / "config.json").exists():
        raise FileNotFoundError(f"{merged} holds no merged model (config.json): run the merge stage first (dvc repro merge)")
    fmt = params.project.answer_format.build()
    tokenizer = models.load_tokenizer(merged)
    items = questions(eval_file, g.eval_questions)
    prompts = [prompt_ids(tokenizer, fmt, q) for q, _ in items]
    longest = max(len(p) for p in prompts) + g.max_new_tokens
    if longest > g.n_ctx:
        raise ValueError(f"gguf.n_ctx ({g.n_ctx}) is too small: the longest eval prompt plus gguf.max_new_tokens "
                         f"needs {longest} tokens; raise gguf.n_ctx or lower gguf.max_new_tokens")
    golds = [gold for _, gold in items]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    converter = fetch_converter()
    base_file = out / gguf_name(params.project.name, g.outtype)
    t = time.perf_counter()
    convert(converter, merged, base_file, g.outtype)
    files = {g.outtype: {"seconds": round(time.perf_counter() - t, 2)}}
    for kind in g.quantizations:
        t = time.perf_counter()
        quantize(base_file, out / gguf_name(params.project.name, kind), kind)
        files[kind] = {"seconds": round(time.perf_counter() - t, 2)}

    reference = answer_hf(merged, params.model.dtype, prompts, g.max_new_tokens, tokenizer)
    merged_score = score(reference["texts"], golds, fmt)
    for kind, record in files.items():
        file = out / gguf_name(params.project.name, kind)
        checked = verify(file, g, tokenizer, fmt, prompts, chat_question=items[0][0])
        texts = checked.pop("texts")
        tag = ollama_tag(params.project.name, kind)
        modelfile = write_modelfile(file, tokenizer, fmt, g, tag)
        record.update(file=file.name, bytes=file.stat().st_size, **tensor_types(file, kind), **checked,
                      **score(texts, golds, fmt), modelfile=modelfile.name)
        record["accuracy_delta_vs_merged"] = record["accuracy"] - merged_score["accuracy"]
        # Identical greedy completions and extracted answers: finer measures of quantization damage than accuracy.
        record["same_answers_as_merged"] = sum(a == b for a, b in zip(texts, reference["texts"])) / len(texts)
        differing = sum(parse(a, fmt).strict != parse(b, fmt).strict for a, b in zip(texts, reference["texts"]))
        record["answers_differing"] = differing
        record["answers_equal_merged"] = 1 - differing / len(texts)
        print(f"gguf: {file.name}: {record['bytes'] / 1e6:.1f} MB, accuracy {record['accuracy']:.3f} "
              f"(merged {merged_score['accuracy']:.3f}), {record['tokens_per_second']} tok/s, "
              f"types {record['tensor_types']}")
        if record["type_mismatch"]:
            print(f"gguf: WARNING {file.name}: llama.cpp did not deliver {kind} for {record['replaced_tensors']}")
        print(f"gguf: ollama create {tag} -f {modelfile}")
    return {
        "converter": f"convert_hf_to_gguf.py from llama-cpp-python {version('llama-cpp-python')}'s vendored llama.cpp",
        "merged": {**merged_score, "tokens_per_second": round(reference["tokens_per_second"], 1)},
        "files": files, "type_mismatch": [k for k, r in files.items() if r["type_mismatch"]],
        "quality_problems": quality_problems(files, g),
        "seconds": round(time.perf_counter() - start, 2),
    }


def check_quality(metrics: dict[str, Any]) -> None:
    if metrics["quality_problems"]:
        raise GGUFCheckError("the GGUF files lose more than the params allow: " + "; ".join(metrics["quality_problems"]))


def main() -> None:
    params = load_params()
    with tracking.stage_run("gguf", params):
        metrics = run(params, path("merged"), path("prepared") / "eval.parquet", path("gguf"))
        tracking.log_metrics(metrics)
        write_metrics("gguf", metrics)
        check_quality(metrics)


if __name__ == "__main__":
    main()

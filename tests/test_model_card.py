"""The model_card stage on the tiny model's real folders, with PLANTED metrics.

The adapter (a real LoRA on the tiny model), the merged model (the tiny model itself) and a
small valid GGUF file are real folders; the metrics files, the evaluation samples and the
reward-curve PNG are planted inputs with distinct, non-round numbers. What is tested is that
the cards carry those numbers faithfully, parse with huggingface_hub's own parser, render to
HTML with working image links, and that their load snippets run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from stages import model_card
from stages.model_card import CARD_FILE, KINDS, CardInputs
from tests.conftest import tiny
from tests.test_register import make_adapter, make_exports

EVAL_SET = {"sha256": "ab" * 32, "n": 20, "limit": 20}
GENERATION = {"task": "gsm8k_answer_format", "decoding": "greedy", "max_new_tokens": 48, "prompt_sha256": "cd" * 8,
              "num_samples": 0, "sample_temperature": None, "backend": "hf"}


def entry(strict: float, flexible: float, block: float) -> dict:
    return {"evaluated": 1, "strict": strict, "flexible": flexible, "strict_stderr": 0.05, "n": 20,
            "answer_block_rate": block, "well_formed_rate": block, "eval_set": EVAL_SET, "generation": GENERATION}


EVALUATE = {
    "base": entry(0.05, 0.15, 0.1), "sft": entry(0.1, 0.2, 0.85), "grpo": entry(0.35, 0.4, 0.95),
    "delta": {"grpo_minus_base": {"strict": 0.3, "flexible": 0.25}, "grpo_minus_sft": {"strict": 0.25, "flexible": 0.2},
              "sft_minus_base": {"strict": 0.05, "flexible": 0.05}},
}
GGUF = {"merged": {"accuracy": 0.4, "correct": 2, "questions": 5, "tokens_per_second": 321.5},
        "files": {"q8_0": {"file": "model-q8_0.gguf", "bytes": 3_300_000, "accuracy": 0.6, "correct": 3, "questions": 5,
                           "same_answers_as_merged": 0.8, "tokens_per_second": 456.7, "type_mismatch": False}}}


def plant_run(root: Path, base_dir: Path, prepared_dir: Path, grpo_metrics: dict | None = None) -> CardInputs:
    """A workspace whose model folders are real and whose metrics/samples/curves are planted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.common.models import base_info

    models = root / "models"
    make_adapter(base_dir, models / "grpo")
    shutil.copytree(base_info(base_dir)["model"], models / "merged")
    shutil.copytree(make_exports(root / "exports"), models / "gguf")
    metrics = root / "metrics"
    metrics.mkdir()
    for name, data in {"evaluate": EVALUATE, "eval_base": {"base": EVALUATE["base"]}, "gguf": GGUF,
                       "sft": {"backend": "trl", "steps": 40, "final_loss": 1.2345, "examples": 256},
                       "grpo": grpo_metrics or {"backend": "trl", "generation": "transformers", "steps": 6, "prompts": 448}}.items():
        (metrics / f"{name}.json").write_text(json.dumps(data))
    samples = root / "reports" / "eval" / "tuned" / "grpo" / "samples.jsonl"
    samples.parent.mkdir(parents=True)
    samples.write_text("".join(json.dumps(r) + "\n" for r in [
        {"doc_id": 0, "question": "What is 2 + 3?", "gold": "5", "completion": "2 + 3 = 5</think><SOLUTION>4</SOLUTION>",
         "strict": "4", "strict_correct": False},
        {"doc_id": 1, "question": "What is 6 + 7?", "gold": "13", "completion": "6 + 7 = 13</think><SOLUTION>13</SOLUTION>",
         "strict": "13", "strict_correct": True}]))
    curves = root / "plots" / "grpo_rewards.png"
    curves.parent.mkdir()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [0.1, 0.3, 0.2])
    fig.savefig(curves)
    plt.close(fig)
    return CardInputs(base_dir=base_dir, adapter_dir=models / "grpo", merged_dir=models / "merged",
                      gguf_dir=models / "gguf", prepared_dir=prepared_dir, metrics_dir=metrics, reward_curves=curves,
                      samples_file=samples, lock_file=root / "dvc.lock", root=root)


@pytest.fixture(scope="module")
def cards(tmp_path_factory, base_dir, prepared_dir):
    root = tmp_path_factory.mktemp("card-run")
    params = tiny({"model": {"lora": {"enabled": True}}})
    inputs = plant_run(root, base_dir, prepared_dir)
    written = model_card.run(params, inputs, root / "models" / "cards")
    return {"root": root, "dir": root / "models" / "cards", "written": written, "params": params}


# --------------------------------------------------------------------------- front matter
def test_front_matter_parses_with_huggingface_hubs_parser(cards):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    expected_library = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
    for kind in KINDS:
        card = ModelCard.load(cards["dir"] / kind / CARD_FILE)  # raises on malformed YAML or model-index
        data = card.data.to_dict()
        assert data["library_name"] == expected_library[kind]
        assert data["license"] == "mit"  # the tiny preset's project.license
        assert data["datasets"] == ["openai/gsm8k"]
        assert "base_model" not in data  # the tiny base is built locally: no hub id to name
        assert {"grpo", "trl"} <= set(data["tags"]) and not {"unsloth", "vllm"} & set(data["tags"])
        name, results = model_index_to_eval_results(data["model-index"])
        assert name == card.data.model_name
        assert {r.dataset_type for r in results} == {"openai/gsm8k"}
    assert "gguf" in ModelCard.load(cards["dir"] / "gguf" / CARD_FILE).data.tags


def test_model_index_numbers_are_the_metrics_files(cards):
    from huggingface_hub import ModelCard

    for kind in KINDS:
        results = ModelCard.load(cards["dir"] / kind / CARD_FILE).data.eval_results
        by_name = {r.metric_name: r for r in results}
        assert by_name["strict-match"].metric_value == EVALUATE["grpo"]["strict"]
        assert by_name["flexible-extract"].metric_value == EVALUATE["grpo"]["flexible"]
        assert by_name["strict-match, base model (reference)"].metric_value == EVALUATE["base"]["strict"]
        assert by_name["flexible-extract, after SFT priming (reference)"].metric_value == EVALUATE["sft"]["flexible"]
        assert {r.dataset_args["n"] for r in results if "llama.cpp" not in r.metric_name} == {EVAL_SET["n"]}
    gguf = {r.metric_name: r for r in ModelCard.load(cards["dir"] / "gguf" / CARD_FILE).data.eval_results}
    q8 = gguf["strict-match, model-q8_0.gguf in llama.cpp"]
    assert (q8.metric_value, q8.dataset_args["n"]) == (0.6, 5)


def test_body_tables_show_the_metrics(cards):
    text = (cards["dir"] / "merged" / CARD_FILE).read_text()
    assert "| after GRPO (this model) | 35.0% | 40.0% | 95.0% | 20 |" in text
    assert "| base model | 5.0% | 15.0% | 10.0% | 20 |" in text
    assert "grpo minus base: +30.0 points strict, +25.0 points flexible" in text
    assert f"Eval set sha256 `{EVAL_SET['sha256']}`" in text
    gguf = (cards["dir"] / "gguf" / CARD_FILE).read_text()
    assert "| `model-q8_0.gguf` | Q8_0 | 3.1 MiB | 60.0% | 80.0% | 456.7 |" in gguf
    # The recipe, rewards and example come from params and the evaluation samples.
    params = cards["params"]
    assert f"| learning rate | {params.sft.learning_rate} | {params.grpo.learning_rate} |" in text
    for spec in params.grpo.rewards:
        assert f"| `{spec.name}` | {spec.weight} |" in text
    assert "6 + 7 = 13</think><SOLUTION>13</SOLUTION>" in text and "gold `13`, right" in text
    assert "## Lineage" in text and "prepared data" in text


# --------------------------------------------------------------------------- rendering
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_cards_render_to_html_with_working_images(cards):
    import markdown
    from huggingface_hub import ModelCard
    from PIL import Image

    for kind in KINDS:
        folder = cards["dir"] / kind
        html = markdown.markdown(ModelCard.load(folder / CARD_FILE).text, extensions=["tables", "fenced_code"])
        assert "<table>" in html and "<h2>Evaluation</h2>" in html
        links = _Links()
        links.feed(html)
        assert sorted(links.images) == ["accuracy.png", "grpo_rewards.png"]
        for src in links.images:
            with Image.open(folder / src) as image:  # exists, beside the card, and is a real PNG
                assert image.format == "PNG" and image.size[0] > 100


def test_load_snippets_run(cards):
    """The python blocks of the adapter and merged cards, run as a user would from the workspace."""
    for kind in ("adapter", "merged"):
        text = (cards["dir"] / kind / CARD_FILE).read_text()
        (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        assert f'model_id = "models/{"grpo" if kind == "adapter" else "merged"}"' in snippet
        out, cwd = io.StringIO(), os.getcwd()
        try:
            os.chdir(cards["root"])
            with contextlib.redirect_stdout(out):
                exec(compile(snippet.replace("max_new_tokens=48", "max_new_tokens=4"), f"{kind}-card", "exec"), {})
        finally:
            os.chdir(cwd)
        assert out.getvalue().strip() != ""  # the random tiny model says something


def test_gguf_card_names_the_real_files(cards):
    text = (cards["dir"] / "gguf" / CARD_FILE).read_text()
    assert "ollama create gsm8k-grpo-tiny:q8_0 -f model-q8_0.Modelfile" in text
    assert 'model_path="models/gguf/model-q8_0.gguf"' in text
    assert (cards["root"] / "models" / "gguf" / "model-q8_0.gguf").exists()


def test_mlflow_description_fits_and_points_at_the_full_card(cards):
    text = (cards["dir"] / "merged" / CARD_FILE).read_text()
    description = model_card.mlflow_description(text, "runs:/abc/card/merged/README.md")
    assert len(description) <= model_card.MLFLOW_DESCRIPTION_LIMIT
    assert description.startswith("# gsm8k-grpo-tiny") and "---\nlicense" not in description
    assert "| after GRPO (this model) | 35.0% |" in description and "![" not in description
    assert description.endswith("`runs:/abc/card/merged/README.md`")
    assert len(model_card.mlflow_description(text, "x", limit=600)) <= 600


# --------------------------------------------------------------------------- other runs
def test_a_gpu_run_names_its_base_model_and_engines(tmp_path, base_dir, prepared_dir):
    """GPU recipe params over the same folders: the base is a hub id, Unsloth and vLLM were used."""
    from huggingface_hub import ModelCard

    params = tiny({"publish": {"merged_repo": "alice/gsm8k-grpo"}}, preset="qwen3-1.7b")
    inputs = plant_run(tmp_path, base_dir, prepared_dir,
                       grpo_metrics={"backend": "unsloth", "generation": "vllm", "steps": 100, "prompts": 7000})
    model_card.run(params, inputs, tmp_path / "cards")
    merged = ModelCard.load(tmp_path / "cards" / "merged" / CARD_FILE)
    assert merged.data.base_model == "unsloth/Qwen3-1.7B-Base" and merged.data.license == "apache-2.0"
    assert merged.data.to_dict()["base_model_relation"] == "finetune"
    assert {"unsloth", "vllm"} <= set(merged.data.tags)
    assert 'model_id = "alice/gsm8k-grpo"' in merged.text
    gguf = ModelCard.load(tmp_path / "cards" / "gguf" / CARD_FILE)
    assert gguf.data.base_model == "alice/gsm8k-grpo" and gguf.data.to_dict()["base_model_relation"] == "quantized"
    adapter = ModelCard.load(tmp_path / "cards" / "adapter" / CARD_FILE)
    assert "models/grpo" in adapter.text  # no adapter repo set: the local folder
    assert (adapter.data.base_model, adapter.data.to_dict()["base_model_relation"]) == ("unsloth/Qwen3-1.7B-Base", "adapter")


def test_missing_inputs_are_named(tmp_path, base_dir, prepared_dir):
    inputs = plant_run(tmp_path, base_dir, prepared_dir)
    (inputs.metrics_dir / "gguf.json").unlink()
    with pytest.raises(FileNotFoundError, match="gguf.json not found"):
        model_card.run(tiny(), inputs, tmp_path / "cards")
    inputs.reward_curves.unlink()
    with pytest.raises(FileNotFoundError, match="grpo_rewards.png not found"):
        model_card.run(tiny(), inputs, tmp_path / "cards")

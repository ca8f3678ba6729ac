"""Stage `publish`: push each model folder with its model card to the Hugging Face Hub (opt-in).

    HF_TOKEN=hf_... python -m stages.publish      # reads params.yaml: project, publish

Off by default: with publish.enabled false the stage writes metrics/publish.json saying so
and sends nothing. When on, for each kind in publish.push (adapter, merged, gguf):

1. The token is read from HF_TOKEN in the environment and from nowhere else (not a token
   saved by `hf auth login`, never params). Without it the stage stops before any request.
2. `HfApi.whoami` checks the token and that the Hub answers (HF_ENDPOINT points at another
   Hub; HF_HUB_OFFLINE=1 forbids any request), so a missing or unreachable Hub stops the
   stage at once, before the MLflow run opens.
3. `create_repo(exist_ok=True, private=publish.private)`: an existing repo keeps its
   visibility.
4. `upload_folder` of a staging folder of links: the model folder's files, and its card
   (README.md and images, models/cards/<kind>) on top, replacing the README.md peft writes
   into adapter folders. huggingface_hub asks the Hub for each file's current id (preupload)
   and commits only the files that differ, so a second run with the same files makes no
   commit: `committed` is false in metrics/publish.json.

Nothing before this stage is touched: a failure leaves every output as it was. The token is
passed to HfApi only; it is written to no file, log, MLflow record or card.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from stages.common import tracking
from stages.common.params import Params, load_params
from stages.common.paths import path, write_metrics

FOLDERS = {"adapter": "grpo", "merged": "merged", "gguf": "gguf"}  # publish.push kind -> dvc.yaml path key
TOKEN_ENV = "HF_TOKEN"


class PublishError(RuntimeError):
    """The Hub cannot be used (no token, unreachable, token rejected); nothing was uploaded."""


def hub_token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise PublishError(f"publish.enabled is true but {TOKEN_ENV} is not set: put a Hub write token in the "
                           f"environment ({TOKEN_ENV}=hf_...), or set publish.enabled: false. Nothing was uploaded.")
    return token


def connect(token: str):
    """An HfApi for HF_ENDPOINT (read now, not at import) whose token the Hub accepted; else PublishError."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        user = api.whoami()
    except OfflineModeIsEnabled as err:
        raise PublishError(f"HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids requests to the Hub ({endpoint}); "
                           "unset both to publish. "
                           "Nothing was uploaded.") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise PublishError(f"the Hub at {endpoint} rejected the token in {TOKEN_ENV} (HTTP {status}); "
                           "use a token with write access. Nothing was uploaded.") from err
    except httpx.HTTPError as err:
        raise PublishError(f"the Hub at {endpoint} cannot be reached ({type(err).__name__}: {err}); "
                           "check the network or HF_ENDPOINT. Nothing was uploaded.") from err
    return api, user.get("name", "?")


def staging(model_dir: Path, card_dir: Path, into: Path) -> list[str]:
    """Links to the model folder's files with the card's files on top; returns the repo paths."""
    files: dict[str, Path] = {}
    for source in (model_dir, card_dir):  # the card's README.md replaces the model folder's
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            files[file.relative_to(source).as_posix()] = file.resolve()
    for rel, file in files.items():
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        (into / rel).symlink_to(file)
    return sorted(files)


def push(api, repo_id: str, model_dir: Path, card_dir: Path, private: bool, message: str) -> dict[str, Any]:
    """Create the repo if needed and upload the folder with its card; commits only what changed."""
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    before = api.repo_info(repo_id).sha  # the commit main points at
    with tempfile.TemporaryDirectory() as tmp:
        files = staging(model_dir, card_dir, Path(tmp))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=message)
    return {"repo_id": repo_id, "url": str(url), "commit": info.oid, "committed": info.oid != before,
            "files": len(files)}


def run(params: Params, folders: dict[str, Path], cards_dir: Path, api) -> dict[str, Any]:
    """Push every kind in publish.push; `api` is a connected HfApi (see connect)."""
    p = params.publish
    for kind in p.push:
        for folder, stage in ((folders[kind], FOLDERS[kind]), (cards_dir / kind, "model_card")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found: run the {stage} stage first (dvc repro {stage})")
    start = time.perf_counter()
    message = f"{params.project.name}: upload from the gsm8k-grpo pipeline (git {tracking.git_commit()[:12]})"
    repos = {}
    for kind, repo_id in p.repos().items():
        repos[kind] = push(api, repo_id, folders[kind], cards_dir / kind, p.private, message)
        print(f"publish: {kind} -> {repos[kind]['url']} "
              f"({'committed ' + repos[kind]['commit'][:12] if repos[kind]['committed'] else 'unchanged, nothing uploaded'})")
    return {"enabled": True, "repos": repos, "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    params = load_params()
    if not params.publish.enabled:
        print("publish: skipped (publish.enabled is false)")
        write_metrics("publish", {"enabled": False, "reason": "publish.enabled is false"})
        return
    api, user = connect(hub_token())
    print(f"publish: the Hub at {api.endpoint} accepted the token (user {user})")
    import mlflow

    with tracking.stage_run("publish", params):
        metrics = run(params, {kind: path(key) for kind, key in FOLDERS.items()}, path("cards"), api)
        mlflow.set_tags({f"hub.{kind}": f"{r['url']}@{r['commit']}" for kind, r in metrics["repos"].items()})
        tracking.log_metrics({f"{kind}_committed": int(r["committed"]) for kind, r in metrics["repos"].items()})
    write_metrics("publish", metrics)


if __name__ == "__main__":
    try:
        main()
    except PublishError as err:
        raise SystemExit(f"error: {err}") from None

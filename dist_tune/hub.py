"""Models named by Hugging Face Hub id, resolved to a snapshot directory in the local hub cache: the cache first
(so HF_HUB_OFFLINE=1 works), a download when it lacks the files and the Hub may be reached."""
from __future__ import annotations

import functools
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from dist_tune.errors import UserError

METADATA = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]  # config, tokenizer, chat template
WEIGHTS = ["*.safetensors"]
SUBFOLDERS = ["*/*"]  # other formats (onnx/, original/ checkpoints); transformers loads the top level


def is_hub_id(name: str) -> bool:
    """`name` or `org/name` as the Hub spells repo ids, and not a path (/, ./, ../, ~)."""
    if name.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def snapshot(repo_id: str, revision: str, *, weights: bool) -> Path:
    """The local snapshot of repo_id at revision holding its config and tokenizer files (weights: and its
    safetensors too); downloaded only when the hub cache lacks them."""
    return _snapshot(repo_id, revision, weights, str(constants.HF_HUB_CACHE))


@functools.cache
def _snapshot(repo_id: str, revision: str, weights: bool, cache_dir: str) -> Path:
    patterns = METADATA + WEIGHTS if weights else METADATA
    cached = _cached(repo_id, revision, patterns, cache_dir)
    if cached is not None and (not weights or any(cached.glob("*.safetensors"))):
        return cached
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model '{_named(repo_id, revision)}' is not in the Hugging Face cache ({cache_dir}) and "
                        f"HF_HUB_OFFLINE is set; run `{_download_command(repo_id, revision)}` where there is "
                        "network, or set HF_HUB_OFFLINE=0")
    path = _download(repo_id, revision, patterns, cache_dir)
    if weights and not any(path.glob("*.safetensors")):
        raise UserError(f"model '{_named(repo_id, revision)}' has no .safetensors weights on the Hugging Face Hub; "
                        "set model.revision to one that has them, or save the model with save_pretrained and point "
                        "model.name_or_path at that directory")
    return path


def _download(repo_id: str, revision: str, patterns: list[str], cache_dir: str) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=SUBFOLDERS, cache_dir=cache_dir))
    except GatedRepoError:
        raise UserError(f"model '{repo_id}' is gated on the Hugging Face Hub; accept its licence on "
                        f"https://huggingface.co/{repo_id} and set HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"model '{repo_id}' is not on the Hugging Face Hub (or is private: set HF_TOKEN); check "
                        "the spelling of model.name_or_path, or point it at a local directory or a preset") from None
    except RevisionNotFoundError:
        raise UserError(f"model '{repo_id}' has no revision '{revision}' on the Hugging Face Hub; set "
                        "model.revision to one of its branches, tags or commit hashes") from None
    except LocalEntryNotFoundError:
        raise UserError(f"cannot reach the Hugging Face Hub for model '{_named(repo_id, revision)}' and it is not "
                        f"cached; check the network, or run `{_download_command(repo_id, revision)}` where there "
                        "is one") from None


def _cached(repo_id: str, revision: str, patterns: list[str], cache_dir: str) -> Path | None:
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=SUBFOLDERS, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached, or an interrupted download
        return None
    return path if (path / "config.json").is_file() else None


def _named(repo_id: str, revision: str) -> str:
    return repo_id if revision == constants.DEFAULT_REVISION else f"{repo_id}@{revision}"


def _download_command(repo_id: str, revision: str) -> str:
    """The `hf` CLI line that puts the model in the hub cache."""
    pinned = "" if revision == constants.DEFAULT_REVISION else f" --revision {revision}"
    return f"hf download {repo_id}{pinned}"

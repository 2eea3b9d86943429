"""Hugging Face Hub downloads: only the diffusers-layout files, into the standard cache.

huggingface_hub honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN itself.
"""

from __future__ import annotations

from pathlib import Path

# The diffusers folders and tokenizers; never the BFL single files (a second 24 GB transformer).
ALLOW_PATTERNS = [
    "model_index.json",
    "transformer/*.safetensors", "transformer/*.json",
    "vae/*.safetensors", "vae/*.json",
    "text_encoder/*.safetensors", "text_encoder/*.json",
    "text_encoder_2/*.safetensors", "text_encoder_2/*.json",
    "tokenizer/*", "tokenizer_2/*",
]


class HubError(RuntimeError):
    """A download that cannot succeed as things stand; the message says what to do."""


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError as e:
        raise HubError(
            f"{repo_id} is gated: your Hugging Face account must accept its licence first.\n"
            f"  1. Open https://huggingface.co/{repo_id} and accept the licence.\n"
            f"  2. Run `hf auth login`, or set HF_TOKEN to a token with read access, then retry."
        ) from e
    except LocalEntryNotFoundError as e:
        raise HubError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). Connect once to download it, or pass --path DIR "
            f"to a local copy (diffusers layout, BFL single files, or a folder written by save.py)."
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{repo_id} was not found on the Hub (or your token cannot see it)") from e

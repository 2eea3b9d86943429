"""Hub downloads: only the diffusers layout, and clear messages for gated repos and offline use."""

import fnmatch
import subprocess
import sys

import pytest

from flux_1.loading import hub

REPO_FILES = [
    "model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json", "tokenizer/vocab.json", "tokenizer_2/spiece.model",
]


def test_allow_patterns_take_the_diffusers_layout_only():
    chosen = {f for f in REPO_FILES if any(fnmatch.fnmatch(f, p) for p in hub.ALLOW_PATTERNS)}
    assert "flux1-dev.safetensors" not in chosen and "ae.safetensors" not in chosen  # never both layouts
    assert "README.md" not in chosen and "dev_grid.jpg" not in chosen
    assert chosen == set(REPO_FILES) - {"flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg"}


def test_download_passes_the_patterns(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def fake(repo_id, allow_patterns):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.download("black-forest-labs/FLUX.1-schnell") == tmp_path
    assert seen == {"repo_id": "black-forest-labs/FLUX.1-schnell", "allow_patterns": hub.ALLOW_PATTERNS}


def test_gated_repo_says_how_to_fix_it(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    http = pytest.importorskip("httpx2" if huggingface_hub.__version__.startswith("2.") else "httpx")

    def gated(repo_id, allow_patterns):
        response = http.Response(403, request=http.Request("GET", "https://huggingface.co"))
        raise GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(hub.HubError) as e:
        hub.download("black-forest-labs/FLUX.1-dev")
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert "gated" in lines[0]
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in lines[1] and "accept" in lines[1]
    assert "hf auth login" in lines[2] and "HF_TOKEN" in lines[2]


def test_offline_with_an_empty_cache_names_path(tmp_path):
    """Real huggingface_hub, HF_HUB_OFFLINE=1 and an empty HF_HOME: no network is touched."""
    code = ("from flux_1.loading.hub import download, HubError\n"
            "try:\n    download('black-forest-labs/FLUX.1-schnell')\n"
            "except HubError as e:\n    print(e)\n")
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": ":".join(sys.path)},
                         capture_output=True, text=True, timeout=120)
    assert "not in the local Hugging Face cache" in out.stdout
    assert "--path" in out.stdout

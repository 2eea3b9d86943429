"""Console scripts: `flux1-generate` (main.py); `flux1-save` and `flux1-compare` follow."""

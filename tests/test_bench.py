"""Smoke test of the benchmark (bench/): the `tiny` configuration end to end, no timing assertions."""

import json

import pytest

from bench import configs, report, weights
from bench.run import main

STAGE_KEYS = {"load_text", "text", "load_transformer", "step", "load_vae", "decode"}


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--config", "tiny", "--quantize", "none", "4", "--lora-rank", "0", "4", "--steps", "1",
            "--warmup", "1", "--reference", "off", "--output-json", str(out / "tiny.json"),
            "--markdown", str(out / "tiny.md"), "--quiet"]
    result = main(args)
    return result, out


def test_report_fields(tiny_result):
    result, out = tiny_result
    on_disk = json.loads((out / "tiny.json").read_text())
    assert on_disk["config"]["name"] == "tiny"
    for key in ("command", "env", "settings", "rows", "analytic", "weights"):
        assert key in on_disk
    assert {"mlx", "openblas_preloaded", "device", "cores"} <= set(on_disk["env"])
    # each side's BLAS and threads (issue 14): ours here, torch's in reference_env (not run here)
    assert {"blas", "blas_provider", "blas_threads", "openblas_num_threads_env"} <= set(on_disk["env"])
    assert isinstance(on_disk["env"]["blas"], str) and on_disk["env"]["blas"]
    assert all(isinstance(r["busy"], list) for r in on_disk["rows"])
    rows = on_disk["rows"]
    assert {(r["quantize"], r["lora_rank"]) for r in rows} == {(None, 0), (None, 4), ("q4", 0), ("q4", 4)}
    for r in rows:
        assert r["impl"] == "ours" and r["precision"] == "float32"
        assert r["step_method"] == "measured" and len(r["step_times_s"]) == 1
        for k in ("step_s", "text_s", "decode_s"):
            assert r[k] > 0
        assert set(r["load_s"]) == {"transformer", "t5", "clip", "vae", "total"}
        assert STAGE_KEYS <= set(r["peak_gb"])
        assert r["peak_gb"]["step"] > 0
        assert set(r["weights_gb"]) == {"transformer", "t5", "clip", "vae"}
        assert r["flops_per_step"] > 0
    lora_rows = [r for r in rows if r["lora_rank"]]
    assert all(r["lora_layers"] > 0 and "lora_impl" in r for r in lora_rows)
    assert all("step_vs_no_lora" in r["ratios"] for r in lora_rows)
    assert all("step_vs_unquantized" in r["ratios"] for r in rows if r["quantize"])
    # q4 weights are smaller than float32 ones
    by = {(r["quantize"], r["lora_rank"]): r for r in rows}
    assert by[("q4", 0)]["weights_gb"]["transformer"] < by[(None, 0)]["weights_gb"]["transformer"]
    assert on_disk["breakdowns"] and on_disk["breakdowns"][0]["linear_s"] > 0
    paired = [b["lora_paired"] for b in on_disk["breakdowns"] if b.get("lora_paired")]
    assert paired and paired[0]["layers"] == lora_rows[0]["lora_layers"]
    md = (out / "tiny.md").read_text()
    assert "| ours | fp32 |" in md and "LoRA r4" in md


def test_full_model_flops_match_the_anchor(tiny_result):
    """Counted from the code's own calls on a lazily built full model: ~74.4 TFLOP per 1024x1024 step."""
    full = tiny_result[0]["analytic"]["full_1024"]
    assert full["recorded"]["total"] == pytest.approx(74.4e12, rel=0.01)
    assert full["recorded"]["total"] == pytest.approx(full["closed_form"]["total"], rel=1e-6)
    assert full["linear_calls"] > 0 and full["attention_calls"] == 57


def test_projection_path(tmp_path):
    """A stage predicted over --max-stage-seconds is projected (0 s forces it), not run."""
    result = main(["--config", "tiny", "--quantize", "none", "8", "--steps", "1", "--warmup", "0",
                   "--reference", "off", "--max-stage-seconds", "0", "--quiet"])
    q8 = next(r for r in result["rows"] if r["quantize"] == "q8")
    assert q8["step_method"] == "projected" and q8["text_method"] == "projected"
    assert q8["step_s"] > 0 and q8["ratios"]["step_vs_unquantized"] > 0
    assert any(b["kind"] == "quantized projection" for b in result["breakdowns"])


def test_random_weights_round_trip_through_the_loader(tmp_path, monkeypatch):
    """The diffusers-layout names the bench writes (sharded, with an index) load strictly into our models."""
    import mlx.core as mx

    from flux_1.loading import folder as loader

    monkeypatch.setattr(weights, "SHARD_BYTES", 200_000)
    cfg = configs.get("tiny")
    weights.write_folder(cfg, tmp_path, log=lambda *a: None)
    index = json.loads((tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert loader.load_folder_component(tmp_path, "transformer", mx.float32).params == cfg.transformer
    assert loader.load_folder_component(tmp_path, "vae", mx.float32).params == cfg.vae
    assert weights.write_folder(cfg, tmp_path, log=lambda *a: None)["reused"]


def test_ratios_against_a_reference_row():
    rows = [
        {"impl": "ours", "precision": "float32", "quantize": None, "lora_rank": 0, "step_s": 1.0,
         "text_s": 2.0, "decode_s": 3.0, "load_s": {"transformer": 1.0, "total": 2.0}},
        {"impl": "ours", "precision": "float32", "quantize": "q4", "lora_rank": 0, "step_s": 1.5},
        {"impl": "diffusers", "precision": "float32", "quantize": None, "lora_rank": 0, "step_s": 2.0,
         "text_s": 4.0, "decode_s": 3.0, "load_s": {"transformer": 4.0, "total": 8.0}},
    ]
    result = {"rows": rows}
    report.add_ratios(result)
    assert rows[0]["ratios"]["step_vs_diffusers"] == 0.5
    assert rows[0]["ratios"]["text_vs_diffusers"] == 0.5
    assert rows[0]["ratios"]["load_total_vs_diffusers"] == 0.25
    assert rows[1]["ratios"]["step_vs_unquantized"] == 1.5


def test_merge_keeps_first_row_and_borrows_the_vae_stage():
    def run(rows, command):
        return {"command": command, "env": {"loadavg_start": None, "loadavg_end": None}, "rows": rows,
                "breakdowns": [{"precision": "float32", "quantize": None, "lora_rank": 0, "kind": "measured step",
                                "step_s": rows[0]["step_s"]}]}

    def row(step, decode=None):
        return {"impl": "ours", "precision": "float32", "quantize": None, "lora_rank": 0, "step_s": step,
                "decode_s": decode, "load_s": {"transformer": 1.0}, "peak_gb": {"step": 1.0},
                "weights_gb": {"transformer": 1.0}}

    a = run([row(2.0)], "a")  # --no-decode run
    b = run([row(3.0, decode=5.0)], "b")
    merged = report.merge([a, b])
    assert [r["step_s"] for r in merged["rows"]] == [2.0]
    assert merged["rows"][0]["decode_s"] == 5.0 and merged["rows"][0]["decode_from_other_run"]
    assert [bd["step_s"] for bd in merged["breakdowns"]] == [2.0]
    assert merged["commands"] == ["a", "b"]


@pytest.fixture(scope="module")
def kontext_result(tmp_path_factory):
    """Kontext beside text to image, at a non-square size (--width overrides the config's)."""
    out = tmp_path_factory.mktemp("bench-kontext")
    args = ["--config", "tiny", "--mode", "txt2img", "kontext", "--width", "160", "--steps", "1", "--warmup", "1",
            "--no-breakdown", "--reference", "off", "--output-json", str(out / "kontext.json"),
            "--markdown", str(out / "kontext.md"), "--quiet"]
    return main(args), out


def test_kontext_mode_fields(kontext_result):
    result, out = kontext_result
    on_disk = json.loads((out / "kontext.json").read_text())
    cfg = on_disk["config"]
    assert (cfg["height"], cfg["width"], cfg["img_tokens"]) == (128, 160, 8 * 10)
    assert on_disk["settings"]["modes"] == ["txt2img", "kontext"] and on_disk["settings"]["encode"]
    by = {r["mode"]: r for r in on_disk["rows"]}
    assert set(by) == {"txt2img", "kontext"} and len(on_disk["rows"]) == 2
    t2i, kon = by["txt2img"], by["kontext"]
    n, txt = cfg["img_tokens"], cfg["txt_tokens"]
    assert t2i["tokens"] == {"image": n, "reference": 0, "text": txt, "sequence": n + txt}
    assert kon["tokens"] == {"image": n, "reference": n, "text": txt, "sequence": 2 * n + txt}  # image tokens doubled
    for r in (t2i, kon):
        assert r["impl"] == "ours" and r["step_method"] == "measured" and len(r["step_times_s"]) == 1
        assert r["step_s"] > 0 and r["peak_gb"]["step"] > 0 and r["decode_s"] > 0
    assert kon["flops_per_step"] > t2i["flops_per_step"]
    assert kon["encode_s"] > 0 and kon["peak_gb"]["encode"] > 0 and "encode_s" not in t2i
    assert {"step_vs_txt2img", "peak_step_vs_txt2img"} <= set(kon["ratios"])
    assert on_disk["analytic"]["this_config_kontext"]["total"] > on_disk["analytic"]["this_config"]["total"]
    assert not on_disk["breakdowns"]  # --no-breakdown
    md = (out / "kontext.md").read_text()
    assert "| ours | fp32, Kontext |" in md and "Kontext beside text to image" in md
    assert f"| {n + txt} / {2 * n + txt} |" in md


def test_kontext_ratios_on_both_sides():
    def row(impl, mode, step, peak):
        return {"impl": impl, "precision": "float32", "quantize": None, "lora_rank": 0, "mode": mode,
                "step_s": step, "peak_gb": {"step": peak}}

    rows = [row("ours", "txt2img", 1.0, 2.0), row("ours", "kontext", 3.0, 4.0),
            row("diffusers", "txt2img", 2.0, 2.0), row("diffusers", "kontext", 4.0, 3.0)]
    report.add_ratios({"rows": rows})
    assert rows[0]["ratios"]["step_vs_diffusers"] == 0.5 and "step_vs_txt2img" not in rows[0]["ratios"]
    assert rows[1]["ratios"]["step_vs_diffusers"] == 0.75  # against diffusers' Kontext row
    assert rows[1]["ratios"]["step_vs_txt2img"] == 3.0 and rows[1]["ratios"]["peak_step_vs_txt2img"] == 2.0
    assert rows[3]["ratios"] == {"step_vs_txt2img": 2.0, "peak_step_vs_txt2img": 1.5}
    # rows from before modes existed are text to image; merge keeps one row per mode
    old = {k: v for k, v in rows[0].items() if k != "mode"}
    merged = report.merge([{"command": "a", "env": {}, "rows": [old, rows[1]]},
                           {"command": "b", "env": {}, "rows": [rows[0]]}])
    assert [report._mode(r) for r in merged["rows"]] == ["txt2img", "kontext"]


def test_merge_clean_keeps_the_least_contended_row():
    def row(mode, step, others):
        return {"impl": "diffusers", "precision": "float32", "quantize": None, "lora_rank": 0, "mode": mode,
                "step_s": step, "step_times_s": [step], "step_others_cpu_s": [others]}

    a = {"command": "a", "env": {}, "rows": [row("txt2img", 50.0, 45.0), row("kontext", 20.0, 1.0)]}
    b = {"command": "b", "env": {}, "rows": [row("txt2img", 12.0, 0.3), row("kontext", 80.0, 68.0)]}
    assert [r["step_s"] for r in report.merge([a, b])["rows"]] == [50.0, 20.0]  # first file's rows
    assert [r["step_s"] for r in report.merge([a, b], clean=True)["rows"]] == [12.0, 20.0]


def test_busy_flag():
    """A row measured while other processes took > 0.2 cores, or after a high load average, is marked."""
    quiet = {"step_times_s": [1.0, 1.0], "step_others_cpu_s": [0.05, 0.1]}
    assert report.busy(quiet, {"loadavg_start": [0.1, 0.2, 0.3], "cores": 2}) == []
    assert report.busy(quiet, {"loadavg_start": [1.5, 0.2, 0.3], "cores": 2})
    loud = {"step_times_s": [1.0, 2.0], "step_others_cpu_s": [0.05, 0.8]}
    assert report.busy(loud, {"loadavg_start": [0.1, 0.1, 0.1], "cores": 2})


def test_reference_process_uses_torchs_own_blas():
    """The diffusers subprocess' environment keeps flux_1 (and its RTLD_GLOBAL OpenBLAS) and any
    LD_PRELOAD out, so torch's `sgemm_` stays its own (MKL in libtorch_cpu.so), not OpenBLAS."""
    import os
    import subprocess
    import sys

    from bench.run import REPO, reference_environ

    env = reference_environ({**os.environ, "LD_PRELOAD": "/nonexistent/libopenblas.so"})
    assert "LD_PRELOAD" not in env and env["FLUX1_BLAS"] == "off" and env["FLUX1_BENCH_REFERENCE"] == "1"
    pytest.importorskip("torch")
    code = ("import json; from bench.reference import torch_blas, global_symbol_provider, BLAS_SYMBOLS; "
            "b = {n: global_symbol_provider(n) for n in BLAS_SYMBOLS}; print(json.dumps(torch_blas(b)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not info["flux_1_imported"]
    assert not info["openblas_for_sgemm"], info["sgemm_provider"]
    assert not any(info["global_blas_before_torch"].values())


def test_alternate_rounds(tmp_path):
    """--alternate N: our step and diffusers' (a resident subprocess) alternately; median and min-max ratio."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    result = main(["--config", "tiny", "--steps", "1", "--warmup", "0", "--no-decode", "--no-breakdown",
                   "--reference", "on", "--alternate", "2", "--weights-dir", str(tmp_path / "w"), "--quiet"])
    alt = result["alternate"]
    assert len(alt["ours_s"]) == len(alt["diffusers_s"]) == 2
    assert alt["ratio_min"] <= alt["ratio_median"] <= alt["ratio_max"]
    assert not alt["reference_env"]["openblas_for_sgemm"]
    assert not result["reference_env"]["openblas_for_sgemm"] and not result["reference_env"]["flux_1_imported"]

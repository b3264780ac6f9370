"""benchmarks/gpu_dreambooth.py keeps working: its CPU run (tiny models, fp32) measures
all five cases, (a) to (e), and the counted FLOPs show what our step leaves out (the VAE encode)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    command = [sys.executable, "benchmarks/gpu_dreambooth.py", "--device", "cpu", "--size", "tiny", "--steps", "1",
               "--warmup", "1", "--images", "2", "--throughput-batches", "2", "--channels-last", "--cases", "abcde",
               "--json", str(path)]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "| (a) diffusers train_dreambooth.py, 1+1 |" in result.stdout  # the Markdown table
    return json.loads(path.read_text())


def test_cpu_run_measures_the_recipe_and_our_trainer(report):
    cases = {row["case"]: row for row in report["cases"]}
    assert list(cases) == ["(a) diffusers train_dreambooth.py, 1+1", "(b) ours, ZeRO-2, 1+1", "(c) ours, ZeRO-2, 2+2",
                           "(c) ours, ZeRO-2, channels_last, 2+2", "(d) ours, LoRA rank 16, ZeRO-2, 1+1",
                           "(e) ours, SDXL LoRA rank 16, ZeRO-2, 1+1, 64 px"]
    for row in cases.values():
        assert row["step_seconds"] > 0 and row["samples_per_second"] == pytest.approx(row["samples_per_step"] / row["step_seconds"])
        assert row["first_step_seconds"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # no card: no peak to compare with
    a, b, c, c_channels_last, lora, _ = cases.values()
    # Same models and batch, but our latents come from the cache: no VAE encoder in the step.
    assert b["tflop_per_step"] < 0.8 * a["tflop_per_step"]
    assert c["tflop_per_step"] == pytest.approx(2 * b["tflop_per_step"], rel=0.05)
    assert c_channels_last["tflop_per_step"] == c["tflop_per_step"]  # a layout, not a different computation
    # LoRA: the same forward, but the frozen layers' weight gradients are never computed.
    assert 0.55 * b["tflop_per_step"] < lora["tflop_per_step"] < 0.8 * b["tflop_per_step"]
    assert report["targets"]["b_over_a_samples_per_second"] == pytest.approx(b["samples_per_second"] / a["samples_per_second"])
    assert report["device_name"] == "CPU" and report["resolution"] == 64


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_dreambooth", REPO / "benchmarks" / "gpu_dreambooth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_case_that_breaks_is_recorded_and_the_others_still_count():
    """On a lent GPU there is one run: a case that fails (out of memory, an op that will
    not build, a library error) becomes a row with its error, not the end of the run."""
    benchmark = load_benchmark()
    device = torch.device("cpu")

    def out_of_memory(name):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    def broken(name):
        raise RuntimeError("Ninja is required to load C++ extensions")

    rows = [benchmark.run_case("(b) ours, ZeRO-2, 1+1", out_of_memory, device),
            benchmark.run_case("(c) ours, ZeRO-2, 8+8", broken, device),
            {"case": "(a) diffusers train_dreambooth.py, 1+1", "samples_per_second": 10.0, "peak_memory_gib": None,
             "mfu": None}]
    assert rows[0] == {"case": "(b) ours, ZeRO-2, 1+1", "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert rows[1] == {"case": "(c) ours, ZeRO-2, 8+8", "error": "RuntimeError: Ninja is required to load C++ extensions"}
    assert benchmark.targets(rows) == {}  # no target is computed from a case that did not run
    table = benchmark.markdown_table({"device_name": "CPU", "date": "d", "torch": "t", "size": "tiny", "resolution": 64,
                                      "optimizer": "o", "cases": rows[:2]})
    assert "| (c) ours, ZeRO-2, 8+8 | RuntimeError: Ninja is required to load C++ extensions |" in table


def test_a_compiled_case_takes_the_flops_of_its_uncompiled_twin():
    """FlopCounterMode on a compiled step would recompile it (minutes of device time):
    the same step's count from the uncompiled case at the same batch is used instead."""
    benchmark = load_benchmark()
    rows = [{"case": "(b) ours, ZeRO-2, 1+1", "samples_per_step": 2, "tflop_per_step": 1.0},
            {"case": "(c) ours, ZeRO-2, 16+16", "error": "out of memory: ..."},
            {"case": "(c) ours, ZeRO-2, 8+8", "samples_per_step": 16, "tflop_per_step": 8.0}]
    assert benchmark.uncompiled_flops(rows, batch_size=8) == 8.0e12
    assert benchmark.uncompiled_flops(rows, batch_size=16) is None  # counted afresh then


def test_the_sdxl_sized_models_have_sdxl_base_weight_counts():
    """(e) measures SDXL only if its configs are SDXL's: counted on the meta device (no memory)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sd_models

    components = sd_models.build_components("sdxl", torch.device("meta"))
    counts = [sum(parameter.numel() for parameter in module.parameters())
              for module in (components.unet, components.text_encoder, components.text_encoder_2, components.vae)]
    # SDXL base 1.0's unet, text_encoder, text_encoder_2 and vae as published.
    assert counts == [2_567_463_684, 123_060_480, 694_659_840, 83_653_863]
    assert components.is_sdxl and sd_models.resolution("sdxl") == 1024


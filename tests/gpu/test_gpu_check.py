"""The GPU check (tests/gpu/gpu_check.py): on CUDA with Dynamic VRAM on and off, --lowvram and
--novram (compared with the normal run); without CUDA it skips, and its logic still runs as a CPU
dry run (normal and lowvram runs, the comparison included: on the CPU they must be bit-identical)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"


def _cuda():
    import torch
    return torch.cuda.is_available()


def test_gpu_guarantees_with_dynamic_vram_on_and_off_and_low_vram_modes(tmp_path):
    if not _cuda():
        pytest.skip("no CUDA device: run tests/gpu/gpu_check.py on a GPU machine")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--dynamic-vram", "both"],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    for run in ("normal", "lowvram", "novram"):
        assert f"run={run} " in proc.stdout, proc.stdout[-8000:]


def test_without_cuda_it_says_so_and_exits_0():
    if _cuda():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_cpu_dry_run_of_the_same_checks():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                          timeout=3600)
    out = proc.stdout
    assert proc.returncode == 0, out[-8000:] + proc.stderr[-4000:]
    passed = [line for line in out.splitlines() if line.startswith("PASS ")]
    for check in ("identity_lambda_0", "identity_lambda_1", "shared_lora_equals_merged", "shared_loha_equals_merged",
                  "shared_lokr_equals_merged", "shared_dora_equals_merged", "shared_diff_equals_merged",
                  "plain_ksampler_unchanged", "sweep_equals_separate_runs"):
        assert any(f" {check}:" in line for line in passed), out
    # the dry run also does a --lowvram run and compares its latents with the normal run's
    for name in ("plain_reference", "pair_lambda_0.5", "lora_pair_lambda_0.5", "sweep"):
        assert any("run=lowvram" in line and f" same_as_normal_{name}: bit-identical True" in line
                   for line in passed), out
    assert "FAIL " not in out

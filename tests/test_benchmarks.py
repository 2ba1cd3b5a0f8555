"""The benchmark scripts run end to end on a tiny size (their figures are checked for shape, not speed)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_sampling_prints_ratios(comfy_root):
    text = run("benchmarks/bench_sampling.py", "--size", "64", "--steps", "2", "--repeats", "1")
    rows = dict(re.findall(r"^(KSampler \(reference only\)|DeRaDiff λ=[\d.]+)\s+[\d.]+\s+([\d.]+)\s+\d+$", text, re.M))
    assert set(rows) == {"KSampler (reference only)", "DeRaDiff λ=0", "DeRaDiff λ=1", "DeRaDiff λ=0.5"}
    assert float(rows["KSampler (reference only)"]) == 1.0 and float(rows["DeRaDiff λ=0.5"]) > 0


def test_bench_sweep_checks_equality(comfy_root):
    text = run("benchmarks/bench_sweep.py", "--lambdas", "0,1.5", "--size", "64", "--steps", "2", "--rounds", "1")
    m = re.search(r"speed-up: ([\d.]+)x\s+max relative difference of the latents: ([\d.e+-]+)", text)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) < 1e-3


def test_bench_shared_weights_tiny(comfy_root):
    text = run("benchmarks/bench_shared_weights.py", "--tiny", "--rounds", "1", "--steps", "2")
    rows = re.findall(r"^(reference alone|shared-weight pair \(LoRA\)|two-full-models pair)\s+([\d.]+)\s+(\d+)\s+([\d.]+)",
                      text, re.M)
    assert [r[0] for r in rows] == ["reference alone", "shared-weight pair (LoRA)", "two-full-models pair"]
    assert all(float(r[1]) > 0 for r in rows)

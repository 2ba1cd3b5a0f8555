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


def test_bench_server_memory_pack_keeps_nothing_alive(comfy_root, tmp_path):
    """Through the real server with the classic cache, a pair's models live exactly as long as
    ComfyUI's cache keeps the node outputs: every diffusion model alive after a prompt is held by
    a cache entry or the loaded list (none by the pack alone), the plain prompt after the pair
    prompts leaves one, and POST /free leaves none."""
    import json
    results = tmp_path / "memory.json"
    run("benchmarks/bench_server_memory.py", "--cache", "classic", "--settle", "0.5", "--json", str(results))
    data = json.loads(results.read_text())
    assert [p["kind"] for p in data["prompts"]] == ["plain", "pair", "lora_pair", "sweep", "realign", "plain"]
    for p in data["prompts"]:
        assert all(m["held_by"] != ["OTHER"] for m in p["models_after"]), (p["kind"], p["models_after"])
        assert p["peak_rss_mib"] > 0
    assert data["prompts"][1]["live"]["BaseModel"] == 2       # the two models of the pair
    assert data["prompts"][-1]["live"]["BaseModel"] == 1      # plain again: the pair is gone
    assert data["prompts"][-1]["live"]["AlignedPair"] == 0
    assert data["after_free"]["live"]["BaseModel"] == 0

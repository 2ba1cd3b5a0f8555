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
    rows = dict(re.findall(r"^(\S.*?)\s+[\d.]+\s+([\d.]+)\s+\d+$", text, re.M))
    assert set(rows) == {"KSampler (reference only)", "DeRaDiff λ=0", "DeRaDiff λ=1", "DeRaDiff λ=0.5",
                         "schedule 0 then 1", "schedule 0.5 then 1", "λ=0.5 full_pass_every=2",
                         "λ=0.5 full_pass_every=3", "LoRA pair λ=0.5 fused", "LoRA pair λ=0.5 two passes"}
    assert float(rows["KSampler (reference only)"]) == 1.0 and all(float(v) > 0 for v in rows.values())


def test_particle_weight_rules_study_tiny(tmp_path):
    """The weight-rule study (pure torch) runs and reports every rule; its plain-DeRaDiff column is the
    unweighted sampler, so at λ = 0.5 it sits below the weighted rules (they move mass toward the reward)."""
    import json
    run("benchmarks/aw_particles_weight_rules.py", "--tiny", "--out", str(tmp_path))
    res = json.loads((tmp_path / "aw_particles_weight_rules.json").read_text())
    table = (tmp_path / "aw_particles_weight_rules.md").read_text()
    assert all(f"{rule} N=4" in table for rule in ("left", "trapezoid", "right"))
    row = next(r for r in res["rows"] if r["lam"] == 0.5)
    assert all(row[f"{rule}/4"][0] > row["plain"][0] for rule in ("left", "trapezoid", "right"))


def test_particle_highdim_study_tiny(comfy_root, tmp_path):
    """The high-dimension particle study runs through the pack's particle path on both worlds: one weight
    per latent, the ESS between 1 and N at every recorded step, and the product world (independent
    disagreement at every pixel) ends with a lower ESS than the modes world (a few directions)."""
    import json
    run("benchmarks/aw_particles_highdim.py", "--tiny", "--out", str(tmp_path))
    res = json.loads((tmp_path / "aw_particles_highdim.json").read_text())
    n = res["config"]["particles"]
    rows = {r["world"]: r for r in res["rows"]}
    assert set(rows) == {"modes", "product"}
    for r in rows.values():
        assert r["weighted_steps"] == res["config"]["steps"] - 1  # one interval between each pair of calls
        assert all(1.0 - 1e-9 <= e <= n + 1e-9 for _, _, e in r["ess"])
    assert rows["product"]["min_ess"] < rows["modes"]["min_ess"]
    assert "ESS over the steps" in (tmp_path / "aw_particles_highdim.md").read_text()


def test_bench_gpu_smoke_run_on_the_cpu(comfy_root, tmp_path):
    """The one-command GPU benchmark, in its --quick form on the CPU: every section runs."""
    out = tmp_path / "gpu.md"
    run("benchmarks/bench_gpu.py", "--device", "cpu", "--quick", "--families", "sd15", "--out", str(out))
    report = out.read_text()
    assert "failed" not in report, report
    assert "λ=0.5 full_pass_every=3" in report and "LoRA pair λ=0.5 fused" in report
    assert re.search(r"speed-up: [\d.]+x", report) and "0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0" in report


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


def test_bench_server_memory_soak_does_not_creep(comfy_root, tmp_path):
    """A short soak through the real server (classic cache; 15 prompts of the soak sequence: two-model
    pair, reference + LoRA pair, λ sweep, Realign Model in a plain KSampler, plain KSampler, with λ
    changing from prompt to prompt; 64x64, 2 steps): over the second half, RSS, its anonymous part
    and the live tensors' storage grow by less than the benchmark's SOAK_SLOPE_BOUND_MIB per prompt
    between prompts of the same kind, the number of live tensors does not grow, and after any prompt
    ComfyUI has loaded no more models than after a plain prompt + the pair's aligned one.
    The 30-prompt soak on demand (see the bound's reasoning in benchmarks/bench_server_memory.py):

        python benchmarks/bench_server_memory.py --soak 30 --steps 2 --cache classic   # or ram, default
    """
    import json
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_server_memory as bench
    results = tmp_path / "soak.json"
    out = subprocess.run([sys.executable, "benchmarks/bench_server_memory.py", "--soak", "15", "--steps", "2",
                          "--cache", "classic", "--settle", "0.5", "--json", str(results)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert results.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(results.read_text())
    soak = data["soak"]
    assert [p["kind"] for p in data["prompts"]] == bench.SOAK_KINDS * 3
    assert len({p["lambda"] for p in data["prompts"] if p["kind"] == "pair"}) == 3  # λ changes
    series = {s["series"]: s for s in soak["series"]}
    assert set(series) == {"RSS MiB", "RSS anon MiB", "live tensor MiB", "live tensors"}
    for s in series.values():
        assert s["slope_within_kind"] is not None and s["slope_within_kind"] < s["bound"], (s, out.stdout[-4000:])
    assert series["RSS MiB"]["bound"] == bench.SOAK_SLOPE_BOUND_MIB
    assert soak["loaded_after_max"] <= soak["loaded_after_plain_max"] + bench.PAIR_EXTRA_MODELS
    assert soak["unowned_models"] == 0
    assert soak["pass"] and out.returncode == 0, (soak["failures"], out.stdout[-4000:], out.stderr[-3000:])
    assert "soak: PASS" in out.stdout


def test_lambda_search_study_tiny(comfy_root, tmp_path):
    """The λ Search precision study (issue 20, item 8) runs end to end through the pack's sweep: every
    objective, noise regime and optimiser has its row, the target objective's score noise is much larger
    at λ = 0 than at its optimum (what the study is about), the optimum is interior, and the same search
    loaded a second time from its file finds exactly the same λ (the measurement is deterministic)."""
    import json
    run("benchmarks/aw_lambda_search.py", "--tiny", "--out", str(tmp_path),
        "--compare-module", "sampler/lambda_search.py")
    res = json.loads((tmp_path / "aw_lambda_search.json").read_text())
    cfg = res["config"]
    rows = {(r["objective"], r["regime"], r["optimiser"]): r for r in res["rows"]}
    names = {"this checkout", "this checkout, variance pooled", "file lambda_search.py"}
    assert set(rows) == {(o, g, n) for o in ("target", "reward_kl") for g in ("node", "fresh") for n in names}
    for r in rows.values():
        assert 0 <= r["hits"] <= r["reps"] == len(r["found"]) == cfg["reps"]
        assert all(cfg["lo"] <= f <= cfg["hi"] for f in r["found"])
    for (o, g, n), r in rows.items():
        if n == "file lambda_search.py":
            assert r["found"] == rows[(o, g, "this checkout")]["found"]
    target = res["objectives"]["target"]
    assert cfg["lo"] + 0.5 < target["lambda_star"] < cfg["hi"] - 0.5
    level = next(iter(target["levels"].values()))
    assert level["se_at_0"] > 3 * level["se_at_star"]
    assert "criterion met" in (tmp_path / "aw_lambda_search.md").read_text()


def test_heun_corrector_study_tiny(comfy_root, tmp_path):
    """full_pass_every with Heun: the corrector (exactly on the next step's sigma) runs both models, so the
    shipped rule costs more passes than letting it follow the plan of the step its sigma opens or of the step
    it corrects, and stays at the k = 1 result (the rules must differ: the study would be vacuous if the
    corrector were never told apart)."""
    import json
    run("benchmarks/aw_heun_corrector.py", "--tiny", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "aw_heun_corrector.json").read_text())
    assert rows
    for r in rows:
        full = r["corrector full"]
        assert full["passes"] < r["k1_passes"]
        for rule in ("corrector reuses", "corrector follows its step"):
            assert full["passes"] > r[rule]["passes"]
            assert abs(full["vs1_err"]) <= abs(r[rule]["vs1_err"]) + 1e-9


def test_table2_tiny_runs_tiny(comfy_root, tmp_path):
    """Table 2 in miniature (issue 21, parts 2 and 3) on a tiny-config family built into a temp folder: every
    graph ran through the real ComfyUI server (one server prompt id per cell, every image read back from
    SaveImage), every section of the report is there with finite numbers, the cells are the ones β_a/λ asks
    for, λ = 1 equals LoraLoader + KSampler, and λ Search spent its budget inside its range."""
    import json
    import math
    from PIL import Image
    run("benchmarks/table2_tiny.py", "--tiny", "--out", str(tmp_path))
    res = json.loads((tmp_path / "table2_tiny.json").read_text())
    s, betas = res["settings"], res["betas"]
    assert res["comfyui"] and res["graphs_run"] == len(res["cells"]) + len(res["scratch"]) + 2
    ids = [c["prompt_id"] for c in res["cells"]] + [r["prompt_id"] for r in res["scratch"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)
    assert {(r["sampler"], r["beta"]) for r in res["scratch"]} == {(x, b) for x in s["samplers"] for b in [None, *betas]}
    assert {c["group"] for c in res["cells"]} == {"main", "hacked", "identity", "fpe2", "particles"}
    for c in res["cells"]:
        seeds = s["particle_seeds"] if c["group"] == "particles" else s["seeds"]
        assert c["images"] == len(c["rewards"]) == s["prompts"] * seeds
        assert c["lam"] * c["beta_t"] == pytest.approx(c["anchor"]) and c["beta_t"] in betas
        for key in ("reward", "reward_se", "scratch_reward", "scratch_se", "delta", "unpaired_se", "fd", "fd_floor",
                    "background_adherence", "scratch_half_gap"):
            assert math.isfinite(c[key]), (c["group"], key)
        if c["group"] == "hacked":
            assert c["anchor"] == min(betas) and c["lam"] < 1
        if c["group"] == "identity":
            assert c["lam"] == 1 and c["max_image_delta"] < 0.05
    for r in res["scratch"]:
        assert r["images"] == len(r["rewards"]) == s["prompts"] * s["seeds"] and math.isfinite(r["reward"])
    main = res["summary"]["all_main"]
    assert main["cells"] == len([c for c in res["cells"] if c["group"] == "main"]) > 0
    assert math.isfinite(main["median_abs_delta"]) and main["max_abs_delta"] >= main["median_abs_delta"]
    search = res["search"]
    assert len(search["evaluations"]) == s["search_budget"]
    assert 0 <= search["best_lambda"] <= s["search_lam_max"] and math.isfinite(search["predicted_mean"])
    assert search["scratch_best"]["reward"] == max(c["reward"] for c in search["scratch"])
    text = (tmp_path / "table2_tiny.md").read_text()
    for head in ("## Headline", "## Reward (main anchors)", "## Second metric", "## Columns", "## The reward-hacked",
                 "## Identity check", "## λ Search"):
        assert head in text
    assert Image.open(tmp_path / "table2_tiny.png").size[0] >= 600


def test_tiny_particles_runs_tiny(comfy_root, tmp_path):
    """benchmarks/tiny_particles.py on the committed tiny family in its tiny setting: each rule's row with its
    counted passes (N = 2 to the end: 4 per step; drawn at σ 10: fewer), the from-scratch comparison and the
    ESS per weighted step, and the report."""
    import json
    import math
    run("benchmarks/tiny_particles.py", "--tiny", "--out", str(tmp_path))
    res = json.loads((tmp_path / "tiny_particles.json").read_text())
    (row,) = res["rows"]
    assert row["lam"] == 2.0 and row["target_beta"] == pytest.approx(500.0)
    assert row["today N=2"]["passes_per_step"] == pytest.approx(4.0)
    assert 2.0 < row["N=2 until σ 10"]["passes_per_step"] < 4.0
    for key in ("plain", "today N=2", "N=2 until σ 10"):
        assert len(row[key]["rewards"]) == 2 and math.isfinite(row[key]["err"]) and row[key]["err_se"] > 0
    assert row["today N=2"]["steps"] and all(1.0 <= s[1] <= 2.0 for s in row["today N=2"]["steps"])
    text = (tmp_path / "tiny_particles.md").read_text()
    assert "| 2 (500) |" in text and "today N=2" in text

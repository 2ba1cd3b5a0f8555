"""Bad input gives a clear error and the server keeps serving (issue 11, reliability).

Every case posts a bad prompt to the real ComfyUI server (tests/server_rig.py) and checks that it
ends in ComfyUI's input validation (HTTP 400 whose node_errors name the node and the input) or in
an execution error whose message starts with the node's display name and the input
("DeRaDiff KSampler: input 'lambda': ..."), never a Python traceback or a bare torch error. Then
the NEXT valid prompt must run and give the right result.

How "the right result" is checked, despite ComfyUI's output cache: the ``baseline`` fixture runs
one prompt at the start with a DeRaDiff KSampler (LoRA pair, the shared-weight path, λ 0.5) for
every case's own seed. There the seed comes through a PrimitiveInt link, so those sampler nodes
have other cache keys than the follow-ups', whose seed is a plain value: a follow-up can never be
answered from the cache (and the test also asserts that its sampler is not among the prompt's
cached nodes), while computing exactly the same thing. The follow-up's latent must equal the
baseline's bit for bit: a bad prompt that left the server in a bad state (patches left on the
shared reference, a half-loaded model in the cache) would change it or fail it.

λ > 1: the general unequal-variance mix (sampler/mixing.py ``geometric_mixture``) can have no
valid Gaussian for λ > 1 (non-positive precision, tested in tests/test_mixing.py), but the nodes
never use it: a pair must share one noise schedule (``check_compatible`` refuses anything else,
see test_schedule_mismatch_is_refused), so both kernels have the same variance and the mixed
precision ((1-λ)+λ)/σ² = 1/σ² is always positive. Through the server λ > 1 therefore cannot hit
that case; ``test_lambda_above_one_samples`` checks that λ 3 and 10 (the input's maximum) give
finite results.

The last test runs a small fixed budget of the random prompt fuzz (scripts/fuzz_prompts.py) on
this server. The larger run, on demand (its own server):

    python scripts/fuzz_prompts.py --prompts 300 --seed 1 [--comfyui /path/to/ComfyUI] [--sdxl]
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from conftest import REPO, STANDIN_DIR
from server_rig import status_messages, status_of
from test_server import (CFG, PACK_NODES, SD15_LORA, SD15_REF, SDXL_ALIGNED_UNET, SDXL_REF, Graph, encode_pair,
                         empty_latent, ksampler, load_checkpoint, load_pair, out, saved_latent)

sys.path.insert(0, str(REPO / "scripts"))
import fuzz_prompts  # noqa: E402

LORA_PAIR = "loras/" + SD15_LORA
FOLLOW_UP_SEED = 7_000_000  # + the case's index; no other test uses these seeds
STEPS = 2
NAN = float("nan")


# -- posting prompts that a strict JSON client could not send ------------------------------

def post(server, graph: dict):
    """POST /prompt with the graph as JSON that may hold NaN / Infinity (what Python's json
    module and JavaScript's JSON.stringify-free clients send; ComfyUI parses it with Python's
    json, which accepts them). Returns (HTTP status, body, history entry or None)."""
    body = json.dumps({"prompt": graph, "client_id": server.client_id}, allow_nan=True)
    r = server.http.post(server.base + "/prompt", data=body, headers={"Content-Type": "application/json"},
                         timeout=60)
    data = r.json()
    if r.status_code != 200:
        return r.status_code, data, None
    return r.status_code, data, server.wait(data["prompt_id"], timeout=300)


def no_traceback(text: str):
    assert "Traceback (most recent call last)" not in text, text
    assert '\n  File "' not in text, text


# -- the valid follow-up ----------------------------------------------------------------------

def _follow_up_nodes(g: Graph, seeds):
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g)
    savers = {}
    for key, seed in seeds.items():
        s = g.add("DeRaDiffKSampler", pair=pair, seed=seed, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0,
                  **{"lambda": 0.5})
        savers[key] = (s, g.add("SaveLatent", samples=out(s), filename_prefix=f"rel_{key}"))
    return savers


@pytest.fixture(scope="module")
def baseline(comfy_server):
    """Latent of the follow-up prompt for every case index (seed from a PrimitiveInt link)."""
    g = Graph()
    seeds = {i: out(g.add("PrimitiveInt", value=FOLLOW_UP_SEED + i)) for i in range(len(CASES) + 1)}
    savers = _follow_up_nodes(g, seeds)
    entry = comfy_server.run(g, timeout=600)
    return {i: saved_latent(comfy_server, entry, saver) for i, (_, saver) in savers.items()}


def assert_server_serves(server, baseline, index):
    g = Graph()
    (sampler, saver), = _follow_up_nodes(g, {index: FOLLOW_UP_SEED + index}).values()
    status, data, entry = post(server, g)
    assert status == 200 and status_of(entry) == "success", f"the valid prompt after the bad one failed: {data} {entry and entry['status']}"
    cached = status_messages(entry).get("execution_cached", {}).get("nodes", [])
    assert sampler not in cached, "the follow-up's sampler came from the cache: it proves nothing"
    latent = saved_latent(server, entry, saver)
    assert torch.isfinite(latent).all()
    assert torch.equal(latent, baseline[index]), \
        f"the valid prompt after the bad one gives another latent (max diff {(latent - baseline[index]).abs().max():.3g})"


# -- bad files in the server's own model folders ---------------------------------------------

BAD = "rel_bad"


@pytest.fixture(scope="module")
def bad_files(comfy_server):
    """corrupt (random bytes) and truncated (the first part of a real stand-in) .safetensors
    in checkpoints/, diffusion_models/ and loras/, and a LoRA whose keys match no layer."""
    from safetensors.torch import save_file
    extra = comfy_server.server.extra_models
    sources = {"checkpoints": "checkpoints/sd15_aligned.safetensors",
               "diffusion_models": "diffusion_models/sd15_aligned_unet.safetensors",
               "loras": "loras/" + SD15_LORA}
    written = []
    for folder, source in sources.items():
        corrupt = extra / folder / f"{BAD}_corrupt.safetensors"
        corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(4096))
        truncated = extra / folder / f"{BAD}_truncated.safetensors"
        data = (STANDIN_DIR / source).read_bytes()
        truncated.write_bytes(data[: len(data) // 3])  # header intact, tensor data cut short
        written += [corrupt, truncated]
    nomatch = extra / "loras" / f"{BAD}_nomatch_lora.safetensors"
    save_file({"lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_no_such_block_proj.alpha": torch.tensor(4.0)}, str(nomatch))
    written.append(nomatch)
    yield
    for path in written:
        path.unlink(missing_ok=True)


# -- the bad prompts ----------------------------------------------------------------------------

def sampler_graph(lam=0.5, reference=SD15_REF, aligned=LORA_PAIR, **kw):
    g = Graph()
    pair, clip, _ = load_pair(g, reference, aligned)
    pos, neg = encode_pair(g, clip)
    inputs = dict(pair=pair, seed=1, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                  positive=pos, negative=neg, latent_image=empty_latent(g), denoise=1.0)
    inputs.update(kw)
    s = g.add("DeRaDiffKSampler", **inputs, **{"lambda": lam})
    g.add("SaveLatent", samples=out(s), filename_prefix="rel_bad")
    return g


def guider_graph(lam):
    g = Graph()
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    guider = g.add("DeRaDiffGuider", pair=pair, positive=pos, negative=neg, cfg=CFG, **{"lambda": lam})
    sigmas = g.add("KarrasScheduler", steps=STEPS, sigma_max=14.6, sigma_min=0.03, rho=7.0)
    s = g.add("SamplerCustomAdvanced", noise=out(g.add("RandomNoise", noise_seed=1)), guider=out(guider),
              sampler=out(g.add("KSamplerSelect", sampler_name="euler")), sigmas=out(sigmas), latent_image=empty_latent(g))
    g.add("SaveLatent", samples=out(s), filename_prefix="rel_bad")
    return g


def realign_graph(lam):
    g = Graph()
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    model = g.add("DeRaDiffRealignModel", pair=pair, **{"lambda": lam})
    g.add("SaveLatent", samples=out(ksampler(g, out(model), pos, neg, empty_latent(g), steps=STEPS)), filename_prefix="rel_bad")
    return g


def schedule_graph(**kw):
    g = Graph()
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    inputs = dict(shape="linear", lambda_from=1.0, lambda_to=0.0, start_percent=0.0, end_percent=1.0,
                  lambda_outside=0.0, custom_values="1, 0.5")
    inputs.update(kw)
    sched = g.add("DeRaDiffLambdaSchedule", **inputs)
    s = g.add("DeRaDiffKSampler", pair=pair, seed=1, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
              positive=pos, negative=neg, latent_image=empty_latent(g), denoise=1.0, lambda_schedule=out(sched),
              **{"lambda": 1.0})
    g.add("SaveLatent", samples=out(s), filename_prefix="rel_bad")
    return g


def sweep_graph(lambdas="0, 1", **kw):
    g = Graph()
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    inputs = dict(pair=pair, lambdas=lambdas, seed=1, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                  positive=pos, negative=neg, latent_image=empty_latent(g), denoise=1.0)
    inputs.update(kw)
    s = g.add("DeRaDiffLambdaSweep", **inputs)
    g.add("SaveLatent", samples=out(s), filename_prefix="rel_bad")
    return g


def make_pair_wrong_link():
    g = Graph()
    model, clip, _ = load_checkpoint(g, SD15_REF)
    pair = g.add("DeRaDiffMakePair", reference=model, aligned=clip)  # CLIP into a MODEL input
    pos, neg = encode_pair(g, clip)
    s = g.add("DeRaDiffKSampler", pair=out(pair), seed=1, steps=STEPS, cfg=CFG, sampler_name="euler",
              scheduler="normal", positive=pos, negative=neg, latent_image=empty_latent(g), denoise=1.0,
              **{"lambda": 0.5})
    g.add("SaveLatent", samples=out(s), filename_prefix="rel_bad")
    return g


def make_pair_plain_value():
    g = make_pair_wrong_link()
    pair = next(n for n, v in g.items() if v["class_type"] == "DeRaDiffMakePair")
    g[pair]["inputs"]["aligned"] = g[pair]["inputs"]["reference"]
    g[pair]["inputs"]["reference"] = None
    return g


V, X = "validation", "execution"
KS, PAIR, SCHED, SWEEP = "DeRaDiffKSampler", "DeRaDiffLoadAlignedPair", "DeRaDiffLambdaSchedule", "DeRaDiffLambdaSweep"
# id -> (graph builder, expected end, node class, input, words the message must hold)
CASES = {
    "family_sd15_with_sdxl": (lambda: sampler_graph(aligned=SDXL_ALIGNED_UNET), X, PAIR, "aligned_model",
                              ["different model families", "SD15", "SDXL", SDXL_ALIGNED_UNET]),
    "lora_matching_nothing": (lambda: sampler_graph(aligned=f"loras/{BAD}_nomatch_lora.safetensors"), X, PAIR,
                              "aligned_model", ["matches none of the reference's layers", f"{BAD}_nomatch_lora"]),
    "lambda_nan_json": (lambda: sampler_graph(NAN), X, KS, "lambda", ["finite", "nan"]),
    "lambda_nan_string": (lambda: sampler_graph("nan"), X, KS, "lambda", ["finite", "nan"]),
    "lambda_nan_guider": (lambda: guider_graph(NAN), X, "DeRaDiffGuider", "lambda", ["finite"]),
    "lambda_nan_realign": (lambda: realign_graph(NAN), X, "DeRaDiffRealignModel", "lambda", ["finite"]),
    "lambda_inf": (lambda: sampler_graph(float("inf")), V, KS, "lambda", ["bigger than max"]),
    "lambda_huge": (lambda: sampler_graph(1e308), V, KS, "lambda", ["bigger than max"]),
    "lambda_negative": (lambda: sampler_graph(-0.5), V, KS, "lambda", ["smaller than min"]),
    "lambda_not_a_number": (lambda: sampler_graph("strong"), V, KS, "lambda", ["FLOAT"]),
    "cfg_nan": (lambda: sampler_graph(0.5, cfg=NAN), X, KS, "cfg", ["finite"]),
    "denoise_nan": (lambda: sampler_graph(0.5, denoise="nan"), X, KS, "denoise", ["finite"]),
    "steps_zero": (lambda: sampler_graph(0.5, steps=0), V, KS, "steps", ["smaller than min"]),
    "sweep_steps_zero": (lambda: sweep_graph(steps=0), V, SWEEP, "steps", ["smaller than min"]),
    "sweep_cfg_nan": (lambda: sweep_graph(cfg=NAN), X, SWEEP, "cfg", ["finite"]),
    "sweep_empty": (lambda: sweep_graph(" , ,"), X, SWEEP, "lambdas", ["at least one"]),
    "sweep_malformed": (lambda: sweep_graph("0, 0.5, abc"), X, SWEEP, "lambdas", ["'abc' is not a number"]),
    "sweep_negative_and_inf": (lambda: sweep_graph("0, -1, 1e400"), X, SWEEP, "lambdas", ["finite", "-1"]),
    "schedule_custom_empty": (lambda: schedule_graph(shape="custom", custom_values=""), X, SCHED, "custom_values",
                              ["at least one"]),
    "schedule_custom_malformed": (lambda: schedule_graph(shape="custom", custom_values="1, 0.5 x"), X, SCHED,
                                  "custom_values", ["'x' is not a number"]),
    "schedule_custom_nan": (lambda: schedule_graph(shape="custom", custom_values="1, nan"), X, SCHED,
                            "custom_values", ["finite"]),
    "schedule_lambda_from_nan": (lambda: schedule_graph(lambda_from=NAN), X, SCHED, "lambda_from", ["finite"]),
    "schedule_start_percent_nan": (lambda: schedule_graph(start_percent="nan"), X, SCHED, "start_percent", ["finite"]),
    "schedule_window_reversed": (lambda: schedule_graph(start_percent=0.8, end_percent=0.2), X, SCHED, "end_percent",
                                 ["before start_percent"]),
    "missing_reference_file": (lambda: sampler_graph(reference="no_such_model.safetensors"), V, PAIR,
                               "reference_ckpt_name", ["not in"]),
    "missing_aligned_file": (lambda: sampler_graph(aligned="loras/no_such_lora.safetensors"), V, PAIR,
                             "aligned_model", ["not in"]),
    # V3 combos: refused when queued on every ComfyUI (0.3.75's server itself lets them through)
    "unknown_sampler_name": (lambda: sampler_graph(sampler_name="no_such_sampler"), V, KS, "sampler_name", ["not in"]),
    "sweep_unknown_scheduler": (lambda: sweep_graph(scheduler="no_such_scheduler"), V, SWEEP, "scheduler", ["not in"]),
    "make_pair_link_to_wrong_output": (make_pair_wrong_link, V, "DeRaDiffMakePair", "aligned", ["CLIP"]),
    # ComfyUI's validation lets a plain value through where a link of a custom type is expected
    # (found by the fuzz: a string as positive crashed deep in the sampler)
    "positive_plain_value": (lambda: sampler_graph(0.5, positive="abc"), X, KS, "positive", ["CONDITIONING"]),
    "sweep_negative_plain_value": (lambda: sweep_graph(negative=3), X, SWEEP, "negative", ["CONDITIONING"]),
    "make_pair_plain_value": (make_pair_plain_value, X, "DeRaDiffMakePair", "reference", ["expected a MODEL"]),
}
for _kind in ("corrupt", "truncated"):
    _what = "header too large" if _kind == "corrupt" else "file not fully covered"
    CASES[f"reference_checkpoint_{_kind}"] = (
        lambda k=_kind: sampler_graph(reference=f"{BAD}_{k}.safetensors"), X, PAIR, "reference_ckpt_name",
        [f"could not load '{BAD}_{_kind}.safetensors'"])
    for _folder in ("checkpoints", "diffusion_models", "loras"):
        CASES[f"aligned_{_folder}_{_kind}"] = (
            lambda k=_kind, f=_folder: sampler_graph(aligned=f"{f}/{BAD}_{k}.safetensors"), X, PAIR, "aligned_model",
            [f"'{BAD}_{_kind}.safetensors'", "could not"])
CASE_IDS = list(CASES)


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_refused_and_the_server_keeps_serving(comfy_server, bad_files, baseline, case):
    build, expected, node_class, input_name, words = CASES[case]
    graph = build()
    status, data, entry = post(comfy_server, graph)
    node_ids = [n for n, v in graph.items() if v["class_type"] == node_class]
    if expected == V:
        assert status == 400, f"expected a validation error, got HTTP {status}: {entry and entry['status']}"
        errors = [(nid, e) for nid, ne in data.get("node_errors", {}).items() for e in ne["errors"]]
        ours = [e for nid, e in errors if nid in node_ids and (e.get("extra_info", {}).get("input_name") == input_name
                                                               or e.get("details", "").startswith(input_name))]
        assert ours, f"no validation error for {node_class} input '{input_name}': {data}"
        text = " ".join(f"{e['message']} {e['details']}" for e in ours)
        for word in words:
            assert word in text, f"{word!r} not in {text!r}"
        no_traceback(text)
    else:
        assert status == 200, f"expected the prompt to be accepted and fail when run: {data}"
        assert status_of(entry) == "error", f"the prompt did not fail: {entry['status']}"
        err = status_messages(entry)["execution_error"]
        msg = err["exception_message"]
        assert err["node_type"] == node_class and err["node_id"] in node_ids, err
        prefix = f"{PACK_NODES[node_class]}: input '{input_name}': "
        assert msg.startswith(prefix), f"{msg!r} does not start with {prefix!r}"
        for word in words:
            assert word in msg, f"{word!r} not in {msg!r}"
        no_traceback(msg)
    assert_server_serves(comfy_server, baseline, CASE_IDS.index(case))


# -- valid edge cases: what a KSampler user expects --------------------------------------------

def test_lambda_above_one_samples(comfy_server):
    """λ > 1 extrapolates with the shared-schedule mix: finite, and further from λ 1 as λ grows."""
    g = Graph()
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g)
    savers = {}
    for lam in (1.0, 3.0, 10.0):
        s = g.add("DeRaDiffKSampler", pair=pair, seed=5, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0, **{"lambda": lam})
        savers[lam] = g.add("SaveLatent", samples=out(s), filename_prefix=f"rel_lam_{lam}")
    entry = comfy_server.run(g, timeout=300)
    lat = {lam: saved_latent(comfy_server, entry, n) for lam, n in savers.items()}
    for lam, x in lat.items():
        assert torch.isfinite(x).all(), f"λ={lam} gave non-finite values"
    d3, d10 = (lat[3.0] - lat[1.0]).abs().mean(), (lat[10.0] - lat[1.0]).abs().mean()
    assert 0 < d3 < d10, (d3, d10)


def test_denoise_zero_returns_the_input_latent_like_ksampler(comfy_server):
    """ComfyUI's KSampler with denoise 0 has no sigmas and returns the input latent unchanged;
    so do DeRaDiff KSampler, the λ Sweep (one copy per λ) and Realign Model in a KSampler."""
    g = Graph()
    pair, clip, _ = load_pair(g, SD15_REF, LORA_PAIR)
    pos, neg = encode_pair(g, clip)
    model, _, _ = load_checkpoint(g, SD15_REF)
    source = out(ksampler(g, model, pos, neg, empty_latent(g), seed=3, steps=1))  # a non-trivial latent
    kw = dict(seed=4, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
              latent_image=source, denoise=0.0)
    nodes = {
        "source": source[0],
        "ksampler": ksampler(g, model, pos, neg, source, seed=4, steps=STEPS, denoise=0.0),
        "deradiff": g.add("DeRaDiffKSampler", pair=pair, **kw, **{"lambda": 0.5}),
        "sweep": g.add("DeRaDiffLambdaSweep", pair=pair, lambdas="0, 0.5, 2", **kw),
        "realign": ksampler(g, out(g.add("DeRaDiffRealignModel", pair=pair, **{"lambda": 0.5})), pos, neg, source,
                            seed=4, steps=STEPS, denoise=0.0),
    }
    savers = {k: g.add("SaveLatent", samples=out(n), filename_prefix=f"rel_d0_{k}") for k, n in nodes.items()}
    entry = comfy_server.run(g, timeout=300)
    lat = {k: saved_latent(comfy_server, entry, n) for k, n in savers.items()}
    src = lat["source"]
    assert src.abs().mean() > 0.01
    for k in ("ksampler", "deradiff", "realign"):
        assert torch.equal(lat[k], src), f"{k} with denoise 0 changed the latent"
    assert lat["sweep"].shape[0] == 3 * src.shape[0]
    for i in range(3):
        assert torch.equal(lat["sweep"][i:i + 1], src), f"sweep λ #{i} with denoise 0 changed the latent"


def test_sdxl_latent_size_not_a_multiple_of_8(comfy_server):
    """72x104 px -> a 9x13 latent (odd, not a multiple of 8): ComfyUI's KSampler samples it, and
    so does DeRaDiff KSampler (λ 0 is exactly KSampler on the reference; λ 0.5 is finite)."""
    g = Graph()
    model, clip, _ = load_checkpoint(g, SDXL_REF)
    unet = out(g.add("UNETLoader", unet_name=SDXL_ALIGNED_UNET.split("/", 1)[1], weight_dtype="default"))
    pair = out(g.add("DeRaDiffMakePair", reference=model, aligned=unet))
    pos, neg = encode_pair(g, clip)
    latent = out(g.add("EmptyLatentImage", width=72, height=104, batch_size=1))
    kw = dict(seed=6, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
              latent_image=latent, denoise=1.0)
    nodes = {"ksampler": ksampler(g, model, pos, neg, latent, seed=6, steps=STEPS),
             "lam0": g.add("DeRaDiffKSampler", pair=pair, **kw, **{"lambda": 0.0}),
             "lam05": g.add("DeRaDiffKSampler", pair=pair, **kw, **{"lambda": 0.5})}
    savers = {k: g.add("SaveLatent", samples=out(n), filename_prefix=f"rel_xl_{k}") for k, n in nodes.items()}
    entry = comfy_server.run(g, timeout=600)
    lat = {k: saved_latent(comfy_server, entry, n) for k, n in savers.items()}
    assert lat["ksampler"].shape == (1, 4, 13, 9)
    assert torch.equal(lat["lam0"], lat["ksampler"])
    assert lat["lam05"].shape == (1, 4, 13, 9) and torch.isfinite(lat["lam05"]).all()
    assert not torch.equal(lat["lam05"], lat["ksampler"])


# -- fuzz ---------------------------------------------------------------------------------------

FUZZ_PROMPTS, FUZZ_SEED = 25, 11


def test_fuzz_small_budget(comfy_server, baseline):
    client = fuzz_prompts.Client(comfy_server.base, alive=comfy_server.check_alive)
    report = fuzz_prompts.run_fuzz(client, FUZZ_PROMPTS, FUZZ_SEED, timeout=180, quick=True, log=lambda line: None)
    print(report.text())
    assert report.tried == FUZZ_PROMPTS
    assert not report.failures, report.text()
    # the budget exercises all three accepted ends, or it proves little
    for kind in fuzz_prompts.ACCEPTED:
        assert report.kinds[kind] > 0, report.text()
    assert_server_serves(comfy_server, baseline, len(CASES))


def test_fuzz_classifier_flags_bad_messages():
    """The fuzz's own judge: tracebacks, bare torch errors and unnamed pack-node errors fail."""
    def entry(node_type, message):
        return {"status": {"status_str": "error", "messages": [
            ["execution_error", {"node_type": node_type, "exception_message": message}]]}}
    ok = "DeRaDiff KSampler: input 'cfg': expected a finite number, got nan"
    assert fuzz_prompts.classify(200, {"prompt_id": "x"}, entry("DeRaDiffKSampler", ok))[0] == "execution_error"
    for node_type, message in [
            ("DeRaDiffKSampler", "cannot convert float NaN to integer"),
            ("KSampler", "size mismatch for weight: copying a param with shape [4]"),
            ("VAEDecode", 'Traceback (most recent call last):\n  File "x.py", line 1'),
            ("DeRaDiffLambdaSchedule", "lambda must be a finite number >= 0, got nan")]:
        assert fuzz_prompts.classify(200, {"prompt_id": "x"}, entry(node_type, message))[0] == "bad_message", message
    assert fuzz_prompts.classify(200, {}, None, timed_out=True)[0] == "hung"
    assert fuzz_prompts.classify(500, "boom", None)[0] == "http_error"
    assert fuzz_prompts.classify(400, {"error": {"type": "x"}, "node_errors": {}}, None)[0] == "validation_error"

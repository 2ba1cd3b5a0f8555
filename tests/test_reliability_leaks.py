"""Reliability through the real ComfyUI server (issue 11): nothing a DeRaDiff prompt does leaks
into the prompts after it, and ComfyUI's cache re-runs what users expect.

1. After a DeRaDiff prompt completes, fails inside sampling, or is cancelled mid-sampling, a plain
   KSampler on the reference (CheckpointLoaderSimple -> KSampler, what users do next) gives a
   latent bit-identical to the one the same plain prompt gave on this server before any DeRaDiff
   prompt ran. Pair kinds: two full checkpoints, reference + LoRA (activation-space hooks),
   reference + LoHa (per-layer weight functions), the λ Sweep, and Realign Model feeding a plain
   KSampler. Every DeRaDiff prompt takes its reference from the same CheckpointLoaderSimple node
   as the plain prompt, so ComfyUI's cache hands the plain prompt the very ModelPatcher (and
   BaseModel) DeRaDiff just sampled with; the test checks that it did.
2. Changing only λ re-runs the sampler and what follows it, never the loaders or text encoders;
   queueing the identical prompt again re-runs nothing (DeRaDiff KSampler and Realign Model).

The module starts its own server (scripts/comfy_server.ComfyServer, like the session server of
server_rig) so that the baseline is computed on a server that has never run a DeRaDiff prompt,
whatever ran before in the session. 64x64 latents and 3 steps, except the cancelled prompts
(60 steps at 256x256, as in test_server.py::test_cancel_over_websocket, so the interrupt sent on
the first progress message lands long before the end). The module takes about 2.5 minutes on two
CPU cores (server start included; measured with other work on the machine), much longer under heavy load.

Each leak test can fail: a patch left on the reference's BaseModel (a forward hook) after the run
fails all fifteen; left only when the run raised (cleanup on the success path only) fails exactly
the fail and cancel cases; LoRA hooks / LoHa weight functions not removed by SharedWeightDelta fail
the lora, loha and realign cases. The cache tests fail under --cache-none and when λ is not changed.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile

import pytest
import torch

from comfy_server import ComfyServer
from conftest import REPO, STANDIN_DIR, ensure_all_standins
from server_rig import ServerClient, status_messages, status_of
from test_server import (CFG, SD15_LORA, SD15_REF, SEED, SIZE, STEPS, Graph, deradiff_ksampler,
                         empty_latent, encode_pair, json_messages, ksampler, load_checkpoint,
                         load_pair, out, saved_latent)

SD15_ALIGNED = "sd15_aligned.safetensors"
LOHA = "deradiff_reliability_loha.safetensors"
CANCEL_STEPS = 60
CANCEL_SIZE = 256


# -- the server and the baseline ---------------------------------------------------------

def write_loha(path):
    """A LoHa for the SD1.5 stand-in on every attention projection, updating each weight by
    roughly 20 % (key layout as in test_copy_and_patches_inprocess.write_adapters)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(11)
    rank, prefix, tensors = 4, "model.diffusion_model.", {}
    with safe_open(str(STANDIN_DIR / "checkpoints" / SD15_REF), framework="pt") as f:
        for key in f.keys():
            if not (key.startswith(prefix) and key.endswith(".weight")
                    and (".attn1.to_" in key or ".attn2.to_" in key)):
                continue
            weight = f.get_tensor(key).float()
            if weight.ndim != 2:
                continue
            out_f, in_f = weight.shape
            name = "lora_unet_" + key[len(prefix):-len(".weight")].replace(".", "_")
            h = math.sqrt(float(weight.abs().mean()) * 3.0)
            rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
            tensors.update({name + ".hada_w1_a": rnd(out_f, rank) * h, name + ".hada_w1_b": rnd(rank, in_f) / in_f ** .25,
                            name + ".hada_w2_a": rnd(out_f, rank) * h, name + ".hada_w2_b": rnd(rank, in_f) / in_f ** .25,
                            name + ".alpha": torch.tensor(float(rank))})
    assert tensors, "no attention projections found in the SD1.5 stand-in"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return len(tensors) // 5


# A plain prompt must really be recomputed after each DeRaDiff prompt, not answered from
# ComfyUI's cache. Cache keys are the node's inputs and its ancestors' (never node ids or
# prefixes), and some cache modes (--cache-ram, --cache-lru) keep results of older prompts. So
# every plain prompt passes its empty latent through LatentMultiply with a multiplier used
# nowhere else: that changes the KSampler's cache key (it must run; checked against the history's
# execution_cached list) but not its result, since an empty latent is all zeros and 0 * m == 0
# exactly. Everything upstream (the checkpoint loader, the text encoders) keeps its key, so the
# plain prompt gets the cached loader output, the MODEL the DeRaDiff prompt sampled with.
_multipliers = (1.0 + i / 64 for i in itertools.count())


def plain_graph(multiplier):
    g = Graph()
    model, clip, vae = load_checkpoint(g, SD15_REF)
    pos, neg = encode_pair(g, clip)
    latent = out(g.add("LatentMultiply", samples=empty_latent(g), multiplier=multiplier))
    sampler = ksampler(g, model, pos, neg, latent)
    saver = g.add("SaveLatent", samples=out(sampler), filename_prefix="plain")
    return g, model[0], sampler, saver


def plain_latent(server):
    """(latent, ids of the nodes ComfyUI served from its cache, loader id) of a plain prompt."""
    g, loader, sampler, saver = plain_graph(next(_multipliers))
    entry = server.run(g, timeout=300)
    cached = set(status_messages(entry).get("execution_cached", {}).get("nodes", []))
    assert sampler not in cached, "the plain KSampler was served from the cache, not recomputed"
    return saved_latent(server, entry, saver), cached, loader


@pytest.fixture(scope="module")
def fresh(comfy_root):
    """(client, baseline latent): a server of this module's own, and the plain prompt's latent
    computed on it before any DeRaDiff prompt."""
    ensure_all_standins()
    root = tempfile.mkdtemp(prefix="deradiff-reliability-")
    server = ComfyServer(comfy_root, STANDIN_DIR, root, extra_args=["--preview-method", "latent2rgb"],
                         log_name="server.log")
    (server.extra_models / "loras").mkdir(parents=True, exist_ok=True)
    loha_layers = write_loha(server.extra_models / "loras" / LOHA)
    try:
        server.start()
        client = ServerClient(server)
        client.loha_layers = loha_layers
        baseline, _, _ = plain_latent(client)
        assert baseline.abs().mean() > 0.01, "the baseline latent is (nearly) zero"
        yield client, baseline
    finally:
        server.stop()
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        if server.log_path.exists():
            shutil.copyfile(server.log_path, artifacts / "comfy-server-reliability.log")
        if not os.environ.get("DERADIFF_SERVER_LOG_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


# -- DeRaDiff prompts of every kind --------------------------------------------------------

KINDS = ("full", "lora", "loha", "sweep", "realign")
# the pair each kind samples with: "full" = two checkpoints (a separate aligned model),
# "lora" = plain LoRA (shared weights, forward hooks), "loha" = LoHa (shared weights, weight functions)
PAIR_OF = {"full": "full", "lora": "lora", "loha": "loha", "sweep": "full", "realign": "loha"}


def make_pair(g: Graph, pair_kind, model, clip):
    if pair_kind == "full":
        aligned = out(g.add("CheckpointLoaderSimple", ckpt_name=SD15_ALIGNED), 0)
    else:
        name = SD15_LORA if pair_kind == "lora" else LOHA
        aligned = out(g.add("LoraLoader", model=model, clip=clip, lora_name=name, strength_model=1.0,
                            strength_clip=0.0), 0)
    return out(g.add("DeRaDiffMakePair", reference=model, aligned=aligned))


def deradiff_graph(kind, outcome):
    """A DeRaDiff prompt whose reference comes from the plain prompt's CheckpointLoaderSimple.
    outcome "complete": λ 0.5, 64x64, 3 steps. "cancel": 60 steps at 256x256. "fail": a 5-D
    (video) latent, which the SD1.5 UNet rejects at its first layer, at λ = 1 so that the error
    is raised inside the aligned model's evaluation (with a shared pair's update applied).
    -> (graph, id of the node that samples)"""
    g = Graph()
    model, clip, vae = load_checkpoint(g, SD15_REF)
    pos, neg = encode_pair(g, clip)
    pair = make_pair(g, PAIR_OF[kind], model, clip)
    steps, lam, lambdas = STEPS, 0.5, "0, 0.5, 1"
    if outcome == "fail":
        latent = out(g.add("EmptyHunyuanLatentVideo", width=SIZE, height=SIZE, length=1, batch_size=1))
        lam, lambdas = 1.0, "1"
    else:
        latent = empty_latent(g, CANCEL_SIZE if outcome == "cancel" else SIZE)
        if outcome == "cancel":
            steps = CANCEL_STEPS
    if kind == "sweep":
        sampler = g.add("DeRaDiffLambdaSweep", pair=pair, lambdas=lambdas, seed=SEED, steps=steps, cfg=CFG,
                        sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
                        latent_image=latent, denoise=1.0)
    elif kind == "realign":
        realigned = g.add("DeRaDiffRealignModel", pair=pair, **{"lambda": lam})
        sampler = ksampler(g, out(realigned), pos, neg, latent, steps=steps)
    else:
        sampler = deradiff_ksampler(g, pair, lam, pos, neg, latent, steps=steps)
    g.add("SaveLatent", samples=out(sampler), filename_prefix=f"leak_{kind}_{outcome}")
    return g, sampler


def run_complete(server, kind):
    log_offset = len(server.log_text())
    g, sampler = deradiff_graph(kind, "complete")
    server.run(g, timeout=300)
    if PAIR_OF[kind] != "full":  # the shared-weights path really ran (not a full copy)
        layers = server.loha_layers if PAIR_OF[kind] == "loha" else None
        log = server.log_text()[log_offset:]
        assert "patched layers" in log and "a second full copy" not in log, log[-2000:]
        if layers:
            assert f"plus {layers} patched layers" in log, log[-2000:]


def run_fail(server, kind):
    g, sampler = deradiff_graph(kind, "fail")
    entry = server.run(g, timeout=300, expect_success=False)
    assert status_of(entry) == "error", f"the prompt did not fail: {entry['status']}"
    err = status_messages(entry).get("execution_error")
    assert err and err["node_id"] == sampler, f"it failed elsewhere than in sampling: {err}"


def run_cancel(server, kind):
    g, sampler = deradiff_graph(kind, "cancel")
    interrupted = []

    def interrupt_on_first_progress(msg, client):
        if isinstance(msg, dict) and msg["type"] == "progress" and not interrupted:
            interrupted.append(msg["data"]["value"])
            client.interrupt(msg["data"]["prompt_id"])

    prompt_id, messages = server.ws_run(g, on_message=interrupt_on_first_progress, timeout=240)
    assert interrupted, "no progress message arrived before the end of the prompt"
    stopped = json_messages(messages, "execution_interrupted", prompt_id)
    assert stopped and stopped[0]["node_id"] == sampler, \
        f"not interrupted in sampling: {stopped or [m['type'] for m in messages if isinstance(m, dict)]}"
    values = [p["value"] for p in json_messages(messages, "progress", prompt_id)]
    assert max(values) < CANCEL_STEPS, f"the run went to the end: {values[-5:]}"


OUTCOMES = {"complete": run_complete, "fail": run_fail, "cancel": run_cancel}
CASES = [(kind, outcome) for kind in KINDS for outcome in OUTCOMES]


@pytest.mark.parametrize("kind,outcome", CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_nothing_leaks_into_a_later_plain_prompt(fresh, kind, outcome):
    server, baseline = fresh
    OUTCOMES[outcome](server, kind)
    latent, cached, loader = plain_latent(server)
    # the plain KSampler ran on the very MODEL the DeRaDiff prompt sampled with
    assert loader in cached, f"the checkpoint loader was re-run (cached: {sorted(cached)})"
    assert latent.shape == baseline.shape
    assert torch.equal(latent, baseline), (
        f"after a {outcome} {kind} DeRaDiff prompt, the plain KSampler on the reference differs from "
        f"its result before any DeRaDiff prompt: max abs difference {(latent - baseline).abs().max():.3g}")


# -- what ComfyUI's cache re-runs ------------------------------------------------------------

def cached_nodes(entry) -> set:
    return set(status_messages(entry).get("execution_cached", {}).get("nodes", []))


def test_changing_only_lambda_re_runs_only_the_sampler(fresh):
    server, _ = fresh
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, "checkpoints/" + SD15_ALIGNED)
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g)
    sampler = deradiff_ksampler(g, pair, 0.5, pos, neg, latent, steps=2)
    decoded = g.add("VAEDecode", samples=out(sampler), vae=vae)
    saver = g.add("SaveImage", images=out(decoded), filename_prefix="cache_lambda")
    server.run(g, timeout=300)
    g[sampler]["inputs"]["lambda"] = 0.75
    second = cached_nodes(server.run(g, timeout=300))
    upstream = {pair[0], pos[0], neg[0], latent[0]}
    assert upstream <= second, f"a new λ re-ran the loader or encoders: cached only {sorted(second)}"
    assert not {sampler, decoded, saver} & second, f"a new λ did not re-run the sampler: cached {sorted(second)}"
    third = cached_nodes(server.run(g, timeout=300))
    assert third == set(g), f"the identical prompt re-ran {sorted(set(g) - third)}"


def test_changing_only_lambda_on_realign_model_re_runs_only_from_it(fresh):
    server, _ = fresh
    g = Graph()
    pair, clip, vae = load_pair(g, SD15_REF, "loras/" + SD15_LORA)
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g)
    realigned = g.add("DeRaDiffRealignModel", pair=pair, **{"lambda": 0.5})
    sampler = ksampler(g, out(realigned), pos, neg, latent, steps=2)
    saver = g.add("SaveLatent", samples=out(sampler), filename_prefix="cache_realign")
    server.run(g, timeout=300)
    g[realigned]["inputs"]["lambda"] = 0.75
    second = cached_nodes(server.run(g, timeout=300))
    assert {pair[0], pos[0], neg[0], latent[0]} <= second, \
        f"a new λ re-ran the loader or encoders: cached only {sorted(second)}"
    assert not {realigned, sampler, saver} & second, f"a new λ did not re-run from Realign Model: {sorted(second)}"
    third = cached_nodes(server.run(g, timeout=300))
    assert third == set(g), f"the identical prompt re-ran {sorted(set(g) - third)}"

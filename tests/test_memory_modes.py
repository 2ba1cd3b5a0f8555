"""ComfyUI's memory modes through the real server: the same DeRaDiff prompt (a reference + LoRA
pair and a two-model pair at λ = 0.5, and a plain KSampler on the reference; fixed seed, 64x64,
2 steps) on one server per mode, started one after another, must give the latents of the normal
mode.

Modes: ``normal`` (no memory option), ``--lowvram``, ``--novram`` and ``--disable-smart-memory``
(ComfyUI unloads every model after each prompt and before loading another one, so the LoRA
pair's reference is patched and unpatched around every use).

Without CUDA ComfyUI only starts with ``--cpu`` (otherwise model_management asks
torch.cuda.current_device() and exits), and its command line puts ``--cpu``, ``--lowvram`` and
``--novram`` in one mutually exclusive group, so there is no CPU server in the low/no-VRAM modes:
on a CPU machine ComfyUI reports ``Set vram state to: DISABLED`` and loads every model whole. There
the test starts the ``--lowvram`` / ``--novram`` servers with ``--cpu`` and checks that ComfyUI
refuses them (nobody can run the pack in those modes on a CPU), and compares latents for
``--disable-smart-memory``, which does change what ComfyUI does on the CPU. With CUDA every mode
starts without ``--cpu``, the log must report the mode's VRAM state, and the latents are compared.

Tolerance: on the CPU the latents must be bit-identical (ComfyUI runs the same kernels on the same
fp32 weights in every mode). On CUDA, low/no VRAM loads part of the UNet and computes LoRA-patched
weights layer by layer at cast time instead of patching them in place once, which may round the
fp16/bf16 weights differently: there the bound is a relative error of CUDA_TOL (as
tests/gpu/gpu_check.py).
"""
from __future__ import annotations

import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from comfy_server import ComfyServer
from conftest import STANDIN_DIR, ensure_all_standins
from test_server import (SD15_ALIGNED_CKPT, SD15_LORA, SD15_REF, Graph, deradiff_ksampler, empty_latent,
                         encode_pair, ksampler, load_checkpoint, out, saved_latent)

CUDA = torch.cuda.is_available()
CUDA_TOL = 2e-3
STEPS, SEED, LAM = 2, 4321, 0.5
MODES = {"normal": [], "lowvram": ["--lowvram"], "novram": ["--novram"],
         "no_smart_memory": ["--disable-smart-memory"]}
VRAM_FLAG_MODES = ("lowvram", "novram")  # in ComfyUI's mutually exclusive group with --cpu
EXPECTED_STATE = {"lowvram": "LOW_VRAM", "novram": "NO_VRAM"}


def mode_graph() -> tuple[Graph, dict]:
    """The prompt of every mode and {output name: SaveLatent node id}."""
    g = Graph()
    ref, clip, _ = load_checkpoint(g, SD15_REF)
    aligned = out(g.add("CheckpointLoaderSimple", ckpt_name=SD15_ALIGNED_CKPT.split("/", 1)[1]))
    pos, neg = encode_pair(g, clip)
    latent = empty_latent(g, 64)
    lora = out(g.add("LoraLoader", model=ref, clip=clip, lora_name=SD15_LORA, strength_model=1.0,
                     strength_clip=0.0))
    pairs = {"lora_pair": out(g.add("DeRaDiffMakePair", reference=ref, aligned=lora)),
             "two_model_pair": out(g.add("DeRaDiffMakePair", reference=ref, aligned=aligned))}
    saves = {}
    for name, pair in pairs.items():
        s = deradiff_ksampler(g, pair, LAM, pos, neg, latent, seed=SEED, steps=STEPS)
        saves[name] = g.add("SaveLatent", samples=out(s), filename_prefix=f"mode_{name}")
    s = ksampler(g, ref, pos, neg, latent, seed=SEED, steps=STEPS)
    saves["plain_reference"] = g.add("SaveLatent", samples=out(s), filename_prefix="mode_plain")
    return g, saves


def vram_state(log: str) -> str | None:
    found = re.findall(r"Set vram state to: (\w+)", log)
    return found[-1] if found else None


@lru_cache(maxsize=None)
def run_mode(mode: str, comfy_root: str) -> dict:
    """Starts a server in `mode`, runs the prompt, stops it. Returns {"state", "device_type",
    "argv", "latents"} or, when ComfyUI refuses to start, {"refused": log}."""
    ensure_all_standins()
    workdir = Path(tempfile.mkdtemp(prefix=f"deradiff-mode-{mode}-"))
    server = ComfyServer(comfy_root, STANDIN_DIR, workdir, cpu=not CUDA, extra_args=MODES[mode],
                         log_name="server.log")
    try:
        try:
            server.start()
        except RuntimeError:  # the process exited before answering
            return {"refused": server.log(), "args": server.args}
        stats = server.get("/system_stats")
        graph, saves = mode_graph()
        entry = server.run(graph, timeout=300)
        return {"state": vram_state(server.log()), "device_type": stats["devices"][0]["type"],
                "argv": stats["system"]["argv"], "args": server.args,
                "latents": {name: saved_latent(server, entry, node) for name, node in saves.items()}}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def assert_same_latents(got: dict, want: dict, mode: str):
    assert set(got) == set(want)
    for name in want:
        a, b = got[name], want[name]
        assert a.shape == b.shape, (mode, name, a.shape, b.shape)
        if CUDA:
            err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            assert err <= CUDA_TOL, f"{mode}: {name} differs from the normal mode by {err:.3g} (relative)"
        else:
            assert torch.equal(a, b), f"{mode}: {name} differs from the normal mode by " \
                                      f"{float((a - b).abs().max()):.3g}"


def test_normal_mode_reports_its_device_and_vram_state(comfy_root):
    r = run_mode("normal", str(comfy_root))
    assert "refused" not in r, r["refused"][-3000:]
    if CUDA:
        assert r["device_type"] == "cuda" and r["state"] not in ("LOW_VRAM", "NO_VRAM", "DISABLED"), r["state"]
    else:
        assert "--cpu" in r["argv"] and r["device_type"] == "cpu" and r["state"] == "DISABLED", \
            (r["argv"], r["device_type"], r["state"])
    for name, lat in r["latents"].items():
        assert lat.shape == (1, 4, 8, 8) and float(lat.abs().max()) > 0, name


@pytest.mark.parametrize("mode", ["lowvram", "novram", "no_smart_memory"])
def test_memory_mode_gives_the_normal_latents(comfy_root, mode):
    r = run_mode(mode, str(comfy_root))
    if not CUDA and mode in VRAM_FLAG_MODES:
        # no CPU server in this mode: ComfyUI's own argument parser refuses --cpu with it
        assert "refused" in r, f"ComfyUI started with {r['args']} (expected it to refuse --cpu --{mode})"
        assert f"argument --{mode}: not allowed with argument --cpu" in r["refused"], r["refused"][-3000:]
        pytest.skip(f"no CUDA: ComfyUI refuses --cpu --{mode} (checked) and needs --cpu without CUDA, "
                    "so the latents can be compared on a CUDA machine only")
    assert "refused" not in r, r["refused"][-3000:]
    flag = MODES[mode][0]
    assert flag in r["argv"], r["argv"]
    if mode in EXPECTED_STATE:
        assert r["state"] == EXPECTED_STATE[mode], (mode, r["state"])
    elif not CUDA:
        assert r["state"] == "DISABLED", r["state"]
    normal = run_mode("normal", str(comfy_root))
    assert "refused" not in normal, normal["refused"][-3000:]
    assert_same_latents(r["latents"], normal["latents"], mode)

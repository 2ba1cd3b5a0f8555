"""Particle realignment on a real trained model: the tiny family (scripts/tiny_family.py), in-process ComfyUI.

    nice -n 10 python benchmarks/tiny_particles.py          # results/tiny_particles.{md,json} (~15 min, 2 CPU cores)
    python benchmarks/tiny_particles.py --tiny --out /tmp/tp  # one prompt, 2 seeds, 3 steps (seconds)
    python benchmarks/tiny_particles.py --rules "today N=8" "N=8 per pixel" --lambdas 2   # some rules only

Models: the family's reference checkpoint; aligned = reference + the anchor's Diffusion-DPO LoRA (β 1000,
LoraLoaderModelOnly, strength 1), paired by DeRaDiff Make Aligned Model Pair; *from scratch* at β/λ = the
reference + that β's LoRA through ComfyUI's KSampler. Sampler euler_ancestral (particle mode needs a stochastic
one), normal scheduler, 20 steps, cfg 4 (the family's sample cfg), 32×32 px (latent 4×4×4), negative = "".
Every run: the same prompts (``sample_attributes(rng(Config(), "eval", 2), P)``) × one EmptyLatentImage batch
per prompt, seed 1000 + prompt index. Particle runs go through particle_ksampler (DeRaDiff KSampler's own path,
one weight per latent) with resample when ESS < 0.5·N.

Reported per λ and rule: the reward (colourfulness, images decoded by the family's VAE) minus the from-scratch
model's, with the standard error of that difference (independent images); passes per step (counted by the
particle state; plain DeRaDiff 2) and wall time against plain DeRaDiff in the same process; the ESS over the
steps (mean over the images, before resampling) and where the log-weights' variance accrues (the variance over
the particles of each interval's increment, mean over images).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from results_io import command_line, write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# The rules measured: today's at N = 4 / 8 / 16, the cheaper ones (DeRaDiff KSampler's particle_select_sigma and
# particle_rule), and three remedies for weights that collapse, each with its bias: no weight above σ 10 (drops
# the first interval, where the quick run's ESS fell to 1.4), tempered weights (exponent 0.5), one weight per
# latent pixel (site_dims 2: treats the pixels as independent).
RULES = (("today N=4", 4, {}, ()), ("today N=8", 8, {}, ()), ("today N=16", 16, {}, ()),
         ("N=4 until σ 0.5", 4, {"select_below": 0.5}, ()),
         ("N=4 until σ 0.5 aligned proposal", 4, {"select_below": 0.5, "proposal": 0.0}, (2.0,)),
         ("N=8 aligned proposal", 8, {"proposal": 0.0}, (2.0,)),
         ("N=8 no weight above σ 10", 8, {"window": (0.0, 10.0)}, ()),
         ("N=8 tempered 0.5", 8, {"temper": 0.5}, ()),
         ("N=8 per pixel", 8, {"site_dims": 2}, ()))


@dataclass(frozen=True)
class Config:
    anchor: float = 1000.0
    lambdas: tuple = (0.5, 2.0)
    # (label, N, particle_ksampler options, λ values it runs at (empty: all)); see RULES
    rules: tuple = RULES
    prompts: int = 2
    seeds: int = 4
    steps: int = 20
    cfg: float = 4.0
    sampler: str = "euler_ancestral"
    scheduler: str = "normal"
    resample_below: float = 0.5


TINY = Config(lambdas=(2.0,), rules=(("today N=2", 2, {}, ()), ("N=2 until σ 10", 2, {"select_below": 10.0}, ())),
              prompts=1, seeds=2, steps=3)


def setup():
    from alignment_world import setup as aw_setup
    pack = aw_setup()
    import folder_paths
    import tiny_family as tf
    tf.materialize(tf.FAMILY_DIR, tf.MODELS_DIR)
    for folder in ("checkpoints", "loras"):
        folder_paths.add_model_folder_path(folder, str(tf.MODELS_DIR / folder), is_default=True)
    return pack, tf


def run(cfg: Config, log=print) -> dict:
    pack, tf = setup()
    import nodes
    import importlib
    ps = importlib.import_module(pack.__name__ + ".sampler.particle_sampler")
    t0 = time.perf_counter()
    reference, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tf.CHECKPOINT_NAME)[:3]

    def lora_model(beta):
        return nodes.LoraLoaderModelOnly().load_lora_model_only(reference, f"{tf.SUBFOLDER}/dpo_beta{beta:g}.safetensors", 1.0)[0]

    pair = pack.nodes.DeRaDiffMakePair.execute(reference, lora_model(cfg.anchor), cfg.anchor).result[0]
    prompts = [a["prompt"] for a in tf.sample_attributes(tf.rng(tf.Config(), "eval", 2), cfg.prompts)]
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    conds = [encode(p) for p in prompts]
    negative = encode("")
    latent = nodes.EmptyLatentImage().generate(32, 32, cfg.seeds)[0]

    def rewards(latents):
        images = vae.decode(latents).detach().float().clamp(0, 1).permute(0, 3, 1, 2)
        return tf.colourfulness(images).tolist()

    def scratch(beta):
        model = lora_model(beta)
        out, t = [], time.perf_counter()
        for p, cond in enumerate(conds):
            lat = nodes.KSampler().sample(model, 1000 + p, cfg.steps, cfg.cfg, cfg.sampler, cfg.scheduler, cond,
                                          negative, latent)[0]
            out += rewards(lat["samples"])
        return {"rewards": out, "seconds": time.perf_counter() - t}

    def plain(lam):
        out, t = [], time.perf_counter()
        for p, cond in enumerate(conds):
            res = pack.nodes.DeRaDiffKSampler.execute(pair, 1000 + p, cfg.steps, cfg.cfg, cfg.sampler, cfg.scheduler,
                                                      cond, negative, latent, 1.0, **{"lambda": lam})
            out += rewards(res.result[0]["samples"])
        return {"rewards": out, "seconds": time.perf_counter() - t, "passes_per_step": 2.0}

    def particles(lam, n, options):
        out, t, records, passes, resamples = [], time.perf_counter(), [], [], 0
        for p, cond in enumerate(conds):
            lat, state = ps.particle_ksampler(pair, lam, 1000 + p, cfg.steps, cfg.cfg, cfg.sampler, cfg.scheduler,
                                              cond, negative, latent, 1.0, n, cfg.resample_below, **options)
            out += rewards(lat["samples"])
            records.append(state.record)
            passes.append(state.passes_per_step())
            resamples += state.summary()["resamples"]
        # per weighted step, averaged over the prompts: (σ, mean ESS, min ESS, increment variance)
        steps = [(r[0][0], sum(x[1] for x in r) / len(r), min(x[2] for x in r), sum(x[4] for x in r) / len(r))
                 for r in zip(*records)] if records and all(records) else []
        return {"rewards": out, "seconds": time.perf_counter() - t, "passes_per_step": sum(passes) / len(passes),
                "steps": steps, "resamples": resamples, "collapsed_steps": sum(1 for s in steps if s[2] < 1.108)}

    def mean_se(values):
        m = sum(values) / len(values)
        return m, (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1) / len(values)) ** 0.5

    plain(cfg.lambdas[0])  # warm-up: the first run loads and patches the models
    rows = []
    for lam in cfg.lambdas:
        target = cfg.anchor / lam
        row = {"lam": lam, "target_beta": target, "scratch": scratch(target), "plain": plain(lam)}
        labels = [label for label, _, _, only in cfg.rules if not only or lam in only]
        for label, n, options, only in cfg.rules:
            if label in labels:
                row[label] = particles(lam, n, dict(options))
                log(f"λ={lam:g} {label}: {row[label]['seconds']:.0f} s")
        sm, sse = mean_se(row["scratch"]["rewards"])
        row["scratch"].update(mean=sm, se=sse)
        for key in ["plain"] + labels:
            m, se = mean_se(row[key]["rewards"])
            row[key].update(mean=m, se=se, err=m - sm, err_se=(se ** 2 + sse ** 2) ** 0.5,
                            time_ratio=row[key]["seconds"] / row["plain"]["seconds"])
        rows.append(row)
        log(f"λ={lam:g} (β {target:g}): scratch {sm:.2f} ± {sse:.2f}; " + "; ".join(
            f"{k} {row[k]['err']:+.2f}" for k in ["plain"] + labels))
    return {"config": asdict(cfg), "prompts": prompts, "rows": rows, "seconds": time.perf_counter() - t0}


def render(res, command: str) -> str:
    cfg = res["config"]
    every = ["plain"] + [r[0] for r in cfg["rules"]]
    L = [f"Measured by `{command}` ({res['seconds']:.0f} s on this machine's CPU, shared 2 cores): the tiny family, "
         f"anchor β = {cfg['anchor']:g}, {cfg['sampler']}, {cfg['scheduler']}, {cfg['steps']} steps, cfg {cfg['cfg']:g}, "
         f"{cfg['prompts']} prompts × {cfg['seeds']} seeds, resample when ESS < {cfg['resample_below']:g}·N, one weight "
         "per latent (4×4×4). Reward = colourfulness; err = reward − from-scratch reward at β/λ ± SE of the "
         "difference; passes per step counted; time = wall time against plain DeRaDiff (same process).", "",
         "| λ (β/λ) | scratch reward | rule | err ± SE | passes/step | time | min ESS | resampled | collapsed steps |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for k in [label for label in every if label in r]:
            c = r[k]
            ess = f"{min(s[2] for s in c['steps']):.2f}" if c.get("steps") else "–"
            L.append(f"| {r['lam']:g} ({r['target_beta']:g}) | {r['scratch']['mean']:.2f} ± {r['scratch']['se']:.2f} | "
                     f"{k} | {c['err']:+.2f} ± {c['err_se']:.2f} | {c['passes_per_step']:.1f} | {c['time_ratio']:.1f}× | "
                     f"{ess} | {c.get('resamples', '–')} | {c.get('collapsed_steps', '–')} |")
    L += ["", "Over the steps, per rule: σ of each weighted model call: mean ESS before resampling (increment "
          "variance over the particles, mean over images):", ""]
    for r in res["rows"]:
        for k in [label for label in every[1:] if label in r and r[label].get("steps")]:
            L.append(f"- λ = {r['lam']:g}, {k}: " + ", ".join(
                f"{s[0]:.2g}: {s[1]:.1f} ({s[3]:.2g})" for s in r[k]["steps"]))
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--lambdas", type=float, nargs="*")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="tiny_particles")
    ap.add_argument("--rules", nargs="*", help="labels of RULES to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="λ = 2, 1 prompt × 2 seeds: ESS and passes only")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else Config()
    if args.quick:  # the ESS over the steps on the real model, 2 images per rule (its reward errors are noise)
        cfg = replace(cfg, lambdas=(2.0,), prompts=1, seeds=2, rules=tuple(
            r for r in RULES if r[0] in ("today N=4", "today N=8", "N=4 until σ 0.5")))
    if args.rules:
        unknown = set(args.rules) - {r[0] for r in RULES}
        if unknown:
            ap.error(f"unknown rules {sorted(unknown)}; known: {[r[0] for r in RULES]}")
        cfg = replace(cfg, rules=tuple(r for r in RULES if r[0] in args.rules))
    if args.lambdas:
        cfg = replace(cfg, lambdas=tuple(args.lambdas))
    for key in ("prompts", "seeds"):
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    res = run(cfg)
    command = command_line("tiny_particles.py", argv)
    text = render(res, command)
    write_results(args.out, args.name, text, res)
    return res


if __name__ == "__main__":
    main()

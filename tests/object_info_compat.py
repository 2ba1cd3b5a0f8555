"""The pack's /object_info as saved workflows and js/deradiff.js depend on it, and the snapshot
of it taken from the V1 nodes before they moved to ComfyUI's V3 schema.

    DERADIFF_COMFYUI=... python tests/object_info_compat.py   # write the snapshot for that ComfyUI

The snapshot files (tests/fixtures/object_info_v1/<ComfyUI version>.json) were written by this
script from the V1 node classes (commit before the V3 migration) through a real server's
/object_info; tests/test_node_schema.py compares today's nodes against them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT_DIR = REPO / "tests" / "fixtures" / "object_info_v1"

PACK_NODES = ("DeRaDiffLoadAlignedPair", "DeRaDiffMakePair", "DeRaDiffKSampler", "DeRaDiffGuider",
              "DeRaDiffLambdaSchedule", "DeRaDiffLambdaSweep", "DeRaDiffSweepGrid", "DeRaDiffRealignModel",
              "DeRaDiffLoadRewardModel", "DeRaDiffRewardScore", "DeRaDiffLambdaSearch")

# Combo inputs whose choices are the files in a model folder: they depend on the machine, so only
# their being a list of strings is compared.
FILE_LIST_INPUTS = {("DeRaDiffLoadAlignedPair", "reference_ckpt_name"), ("DeRaDiffLoadAlignedPair", "aligned_model"),
                    ("DeRaDiffLoadRewardModel", "model"), ("DeRaDiffLoadRewardModel", "aesthetic_head")}

# Fields the V1 /object_info already had; the V3 schema adds deprecated / experimental / api_node,
# which are compared on their own (experimental is set on purpose on some nodes).
COMPARED_FIELDS = ("input", "input_order", "output", "output_is_list", "output_name", "output_tooltips", "name",
                   "display_name", "description", "category", "output_node", "python_module")

# Input options newer ComfyUI's V3 schema may add (the pack sets them where ComfyUI has them; older
# front ends ignore them), and the tooltip: help text, kept in step with the measurements it quotes
# (locales/en/main.json holds the current texts). Everything else in an input's options must be as before.
V3_INPUT_EXTRAS = ("advanced", "tooltip")


# Optional inputs added after the V1 snapshot, with their defaults. They come last, so a workflow saved
# before them loads every old widget value in place (js/deradiff.js resets a stray display-box value that
# lands on them), and a saved prompt without them runs exactly as before.
ADDED_INPUTS = {node: {"particle_rule": "trapezoid", "particle_select_sigma": 0.0}
                for node in ("DeRaDiffKSampler", "DeRaDiffGuider", "DeRaDiffLambdaSearch")}


def without_added_inputs(node_id: str, info: dict) -> dict:
    """``info`` (normalised) without the inputs added after the snapshot; each must be optional, at the end
    of the optional inputs, with its listed default."""
    added = ADDED_INPUTS.get(node_id, {})
    if not added:
        return info
    info = json.loads(json.dumps(info))
    optional, order = info["input"].get("optional", {}), info["input_order"].get("optional", [])
    assert order[-len(added):] == list(added), f"{node_id}: the added inputs {list(added)} must come last: {order}"
    for name, default in added.items():
        spec = optional.pop(name)
        assert len(spec) > 1 and spec[1].get("default") == default, f"{node_id}: {name} default {spec}"
    info["input_order"]["optional"] = order[:-len(added)]
    return info


def comfyui_version(comfy_root) -> str:
    text = (Path(comfy_root) / "comfyui_version.py").read_text()
    return text.split('"')[1]


def normalise(node_id: str, info: dict) -> dict:
    """The compared part of one node's /object_info entry, as JSON would give it."""
    info = json.loads(json.dumps(info))
    out = {key: info.get(key) for key in COMPARED_FIELDS}
    if out["output_tooltips"] is not None:
        out["output_tooltips"] = [t or None for t in out["output_tooltips"]]
    for group, inputs in (out["input"] or {}).items():
        if group == "hidden":
            continue
        for name, declared in inputs.items():
            inputs[name] = declared = _v1_form(declared)
            if (node_id, name) in FILE_LIST_INPUTS and declared[0] != "<files>":
                assert isinstance(declared[0], list) and all(isinstance(c, str) for c in declared[0]), declared
                declared[0] = "<files>"
    return out


def _v1_form(declared: list) -> list:
    """One input spec in the V1 layout. The V3 schema writes a combo as ("COMBO", {"options": [...],
    "multiselect": false}) where V1 wrote ([...], {}), and says "multiline": false where V1 left it
    out; the front end (and a saved workflow) reads both the same way."""
    kind, options = declared[0], dict(declared[1]) if len(declared) > 1 else {}
    if kind == "COMBO" and "options" in options:
        kind = options.pop("options")
        if options.get("multiselect") is False:
            del options["multiselect"]
    if options.get("multiline") is False:
        del options["multiline"]
    for extra in V3_INPUT_EXTRAS:
        options.pop(extra, None)
    return [kind, options] if len(declared) > 1 or options else [kind]


def snapshot_path(version: str) -> Path:
    return SNAPSHOT_DIR / f"{version}.json"


def main() -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO / "tests"))
    import comfyui_runtime
    from comfy_server import ComfyServer
    from standins import STANDIN_DIR, ensure_all_standins
    root = comfyui_runtime.comfyui_root()
    ensure_all_standins()
    with ComfyServer(root, STANDIN_DIR) as server:
        raw = {node: server.get(f"/object_info/{node}")[node] for node in PACK_NODES}
    path = snapshot_path(comfyui_version(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({n: normalise(n, i) for n, i in raw.items()}, indent=1, ensure_ascii=False,
                               sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

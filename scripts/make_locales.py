"""Writes locales/en/main.json from the node classes: every node's display name, description,
input names and tooltips and output names and tooltips, in the front end's ``nodeDefs`` layout,
so translators (and the front end's i18n) have the pack's English texts in one file.

    python scripts/make_locales.py           # rewrite locales/en/main.json
    python scripts/make_locales.py --check   # exit 1 when the committed file is out of date

Needs ComfyUI importable (scripts/comfyui_runtime.py finds it) because the inputs' choices come
from ComfyUI. tests/test_packaging.py checks that the committed file is current.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCALE_FILE = REPO / "locales" / "en" / "main.json"


def _input_entries(node_class) -> dict:
    spec = node_class.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, declared in spec.get(group, {}).items():
            options = declared[1] if len(declared) > 1 and isinstance(declared[1], dict) else {}
            entry = {"name": name}
            if options.get("tooltip"):
                entry["tooltip"] = options["tooltip"]
            out[name] = entry
    return out


def _output_entries(node_class) -> dict:
    types = getattr(node_class, "RETURN_TYPES", ())
    names = getattr(node_class, "RETURN_NAMES", None) or types
    tooltips = getattr(node_class, "OUTPUT_TOOLTIPS", None) or ()
    out = {}
    for i, name in enumerate(names):
        entry = {"name": name}
        if i < len(tooltips) and tooltips[i]:
            entry["tooltip"] = tooltips[i]
        out[str(i)] = entry
    return out


def node_defs(mappings: dict, display_names: dict) -> dict:
    defs = {}
    for node_id, node_class in mappings.items():
        entry = {"display_name": display_names.get(node_id, node_id)}
        if getattr(node_class, "DESCRIPTION", None):
            entry["description"] = node_class.DESCRIPTION
        entry["inputs"] = _input_entries(node_class)
        entry["outputs"] = _output_entries(node_class)
        defs[node_id] = entry
    return defs


def render(pack) -> str:
    data = {"nodeDefs": node_defs(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def load_pack():
    sys.path.insert(0, str(REPO / "scripts"))
    import comfyui_runtime
    comfyui_runtime.add_to_path(comfyui_runtime.ensure_runtime())
    import importlib.util
    spec = importlib.util.spec_from_file_location("comfyui_deradiff", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_deradiff"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when locales/en/main.json is out of date")
    args = ap.parse_args(argv)
    text = render(load_pack())
    if args.check:
        current = LOCALE_FILE.read_text(encoding="utf-8") if LOCALE_FILE.exists() else ""
        if current != text:
            print(f"{LOCALE_FILE.relative_to(REPO)} is out of date: run python scripts/make_locales.py")
            return 1
        return 0
    LOCALE_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOCALE_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {LOCALE_FILE.relative_to(REPO)} ({len(json.loads(text)['nodeDefs'])} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The nodes on ComfyUI's V3 schema: same public API as the V1 nodes, plus the V3 extras where the
running ComfyUI has them.

The V1 /object_info of every node was saved (tests/object_info_compat.py, one file per ComfyUI
version) before the migration; here today's /object_info must equal it, in-process (both
ComfyUI versions) and through a real server. The only allowed differences are the fields the
V3 schema adds by itself (deprecated / experimental / api_node keys, ``advanced`` on inputs,
``search_aliases``, the combo layout ("COMBO", {"options": ...}) that the front end reads like
the V1 list, and the hidden prompt / extra_pnginfo every V3 output node receives).
"""
from __future__ import annotations

import json

import pytest

import object_info_compat as compat

PARTICLE_EXPERT = {"particles", "resample_ess", "particle_rule", "particle_select_sigma"}
ADVANCED_INPUTS = {
    "DeRaDiffKSampler": {"full_pass_every", *PARTICLE_EXPERT},
    "DeRaDiffGuider": {"full_pass_every", *PARTICLE_EXPERT},
    "DeRaDiffRealignModel": {"full_pass_every"},
    "DeRaDiffLambdaSweep": {"full_pass_every", "max_lambdas_per_pass"},
    "DeRaDiffLambdaSearch": {"budget", "lambdas_per_round", "max_lambdas_per_pass", *PARTICLE_EXPERT},
}
EXPERIMENTAL_NODES = {"DeRaDiffLambdaSearch"}
SEARCH_ALIASES = ["alignment strength", "DPO", "realign", "beta", "KL"]
# What ComfyUI's V3 schema gives every output node by itself (Schema.finalize); not read by the node.
OUTPUT_NODE_HIDDEN = {"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]}


@pytest.fixture(scope="module")
def snapshot(comfy_root):
    path = compat.snapshot_path(compat.comfyui_version(comfy_root))
    if not path.exists():
        pytest.skip(f"no V1 /object_info snapshot for this ComfyUI ({path.name}); the tests cover 0.3.75 and 0.33.0")
    return json.loads(path.read_text(encoding="utf-8"))


def _split_hidden(node_id, info):
    """(info without the hidden inputs the V3 schema adds to output nodes, the hidden inputs)."""
    info = json.loads(json.dumps(info))
    hidden = info["input"].pop("hidden", {})
    hidden_order = info["input_order"].pop("hidden", [])
    assert list(hidden) == hidden_order
    return info, hidden


def _assert_same_api(node_id, live_info, want_info, compare_module=True):
    live, hidden = _split_hidden(node_id, compat.without_added_inputs(node_id, compat.normalise(node_id, live_info)))
    want, want_hidden = _split_hidden(node_id, compat.normalise(node_id, want_info))
    if want["output_node"]:
        assert hidden == {**want_hidden, **OUTPUT_NODE_HIDDEN}, hidden
    else:
        assert hidden == want_hidden, f"{node_id}: hidden inputs changed: {hidden}"
    if not compare_module:
        live.pop("python_module"), want.pop("python_module")
    for field in want:
        assert live[field] == want[field], (f"{node_id}: /object_info field {field!r} changed:\n now "
                                            f"{json.dumps(live[field], ensure_ascii=False)[:2000]}\n was "
                                            f"{json.dumps(want[field], ensure_ascii=False)[:2000]}")


def test_every_node_is_a_v3_node_under_its_old_id(pack):
    from comfy_api.latest import io
    assert set(pack.NODE_CLASS_MAPPINGS) == set(compat.PACK_NODES)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert issubclass(cls, io.ComfyNode), node_id
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id
        assert schema.display_name == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]


def test_object_info_in_process_equals_the_v1_nodes(pack, snapshot):
    """Every node's /object_info (as the server builds it for a V3 node) against the V1 snapshot."""
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        _assert_same_api(node_id, cls.GET_NODE_INFO_V1(), snapshot[node_id], compare_module=False)


def test_object_info_comparison_can_fail(pack, snapshot):
    """The comparison notices a changed default, a renamed output and a changed type."""
    info = pack.NODE_CLASS_MAPPINGS["DeRaDiffKSampler"].GET_NODE_INFO_V1()
    for change in (lambda i: i["input"]["optional"]["full_pass_every"][1].__setitem__("default", 2),
                   lambda i: i["output_name"].__setitem__(0, "latent"),
                   lambda i: i["input"]["required"].__setitem__("pair", ["DERADIFF_PAIR2", {}]),
                   lambda i: i["input"]["optional"]["particle_rule"][1].__setitem__("default", "start"),
                   lambda i: i["input_order"]["optional"].append(i["input_order"]["optional"].pop(0))):
        changed = json.loads(json.dumps(info))
        change(changed)
        with pytest.raises(AssertionError):
            _assert_same_api("DeRaDiffKSampler", changed, snapshot["DeRaDiffKSampler"], compare_module=False)


def test_object_info_through_the_server_equals_the_v1_nodes(comfy_server, snapshot):
    for node_id in compat.PACK_NODES:
        _assert_same_api(node_id, comfy_server.object_info(node_id), snapshot[node_id])


def test_v3_extras_where_comfyui_has_them(pack, comfy_root):
    """advanced on the expert inputs and search aliases where ComfyUI's V3 schema has them (0.33.0),
    absent (and nothing else changed: see the snapshot tests) where it does not (0.3.75);
    experimental on λ Search everywhere (both versions have it)."""
    from comfyui_deradiff.nodes import v3_features
    version = tuple(int(p) for p in compat.comfyui_version(comfy_root).split("."))
    # the detection itself: 0.3.75 lacks both features, 0.33.0 has both
    if version <= (0, 3, 75):
        assert not v3_features.INPUTS_HAVE_ADVANCED and not v3_features.SCHEMA_HAS_SEARCH_ALIASES
    if version >= (0, 33, 0):
        assert v3_features.INPUTS_HAVE_ADVANCED and v3_features.SCHEMA_HAS_SEARCH_ALIASES
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        info = cls.GET_NODE_INFO_V1()
        flagged = {name for group in ("required", "optional") for name, spec in info["input"].get(group, {}).items()
                   if len(spec) > 1 and spec[1].get("advanced")}
        want = ADVANCED_INPUTS.get(node_id, set()) if v3_features.INPUTS_HAVE_ADVANCED else set()
        assert flagged == want, node_id
        assert bool(info.get("experimental")) == (node_id in EXPERIMENTAL_NODES), node_id
        if v3_features.SCHEMA_HAS_SEARCH_ALIASES:
            assert info["search_aliases"] == SEARCH_ALIASES, node_id
        else:
            assert not info.get("search_aliases"), node_id

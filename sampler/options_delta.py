"""What a MODEL's options gained after a point in the graph. Pure Python: no ComfyUI import.

ComfyUI nodes that patch a MODEL (FreeU, attention patches, PAG, context windows, compile
and caching wrappers) clone it and append to its ``model_options``: lists grow at the
end, dicts gain keys. ComfyUI 0.3.75's ``clone()`` deep-copies those options, so later
additions cannot be found by identity; they are found by position instead: the shape
recorded when DeRaDiff Realign Model made its MODEL (dict keys, list lengths) tells
which entries came after it.
"""
from __future__ import annotations


def options_shape(options):
    """Dict keys and list lengths of ``options``, recursively (values themselves are not kept)."""
    if isinstance(options, dict):
        return {key: options_shape(value) for key, value in options.items()}
    if isinstance(options, list):
        return len(options)
    return None


def added_since(shape, options):
    """The part of ``options`` not covered by ``shape``: new keys, and list entries past the
    recorded length. Values that were there already are the MODEL's own and left out."""
    if isinstance(options, dict):
        out = {}
        for key, value in options.items():
            if not isinstance(shape, dict) or key not in shape:
                out[key] = value
                continue
            sub = added_since(shape[key], value)
            if sub:
                out[key] = sub
        return out
    if isinstance(options, list):
        return list(options[shape if isinstance(shape, int) else 0:])
    return None


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` added: dicts merged recursively, lists concatenated, other values
    set only where ``base`` has none. Neither argument is modified."""
    out = dict(base)
    for key, value in extra.items():
        mine = out.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            out[key] = merged(mine, value)
        elif isinstance(value, list) and isinstance(mine, list):
            out[key] = mine + value
        elif key not in out:
            out[key] = value
    return out


def select(options: dict, paths) -> dict:
    """Only the entries of ``options`` under the given key paths, e.g. ("transformer_options", "patches")."""
    out = {}
    for path in paths:
        node, target = options, out
        for i, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                break
            if i == len(path) - 1:
                target[key] = node[key]
            else:
                node = node[key]
                target = target.setdefault(key, {})
    return _prune(out)


def _prune(d):
    if not isinstance(d, dict):
        return d
    out = {}
    for k, v in d.items():
        v = _prune(v)
        if v not in ({}, [], None):
            out[k] = v
    return out

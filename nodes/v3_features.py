"""The V3 schema features that only newer ComfyUI has, detected once here (never by version number).

ComfyUI 0.3.75 has the V3 node schema (``comfy_api.latest.io``) with ``is_experimental``, but
inputs take no ``advanced`` flag and a Schema has no ``search_aliases``; 0.33.0 has both. The
nodes ask this module for the keyword arguments and get an empty dict where a feature is
missing, so the same node definitions load on both (the older front end simply shows every input
and finds nodes by their names)."""
from __future__ import annotations

import dataclasses
import inspect

from comfy_api.latest import io

INPUTS_HAVE_ADVANCED = "advanced" in inspect.signature(io.Input.__init__).parameters
SCHEMA_HAS_SEARCH_ALIASES = "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}


def advanced() -> dict:
    """Keyword arguments marking an expert input: folded away under 'advanced' where the front end can."""
    return {"advanced": True} if INPUTS_HAVE_ADVANCED else {}


def search_aliases(*aliases: str) -> dict:
    """Schema keyword arguments: other words a user may type to find the node in the node search."""
    return {"search_aliases": list(aliases)} if SCHEMA_HAS_SEARCH_ALIASES else {}

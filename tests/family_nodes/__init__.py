"""A TEST-ONLY ComfyUI custom node: conditioning of a family's shapes without its text encoder.

Loaded only by the test server rig (tests/server_rig.py links this folder into the test server's
custom_nodes next to the pack); the shipped pack (the repository root's __init__.py) never registers it.
"""
from .conditioning import WIDTHS, family_conditioning


class DeRaDiffTestFamilyConditioning:
    CATEGORY = "_for_testing/deradiff"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    DESCRIPTION = "Test only: random conditioning with the shapes of a family's text encoder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (sorted(WIDTHS),), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    def make(self, family, seed, tokens):
        return (family_conditioning(family, seed, tokens),)


NODE_CLASS_MAPPINGS = {"DeRaDiffTestFamilyConditioning": DeRaDiffTestFamilyConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"DeRaDiffTestFamilyConditioning": "DeRaDiff test: family conditioning"}

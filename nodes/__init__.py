from .pair_nodes import DeRaDiffLoadAlignedPair, DeRaDiffMakePair
from .sampler_nodes import DeRaDiffGuiderNode, DeRaDiffKSampler

NODE_CLASS_MAPPINGS = {
    "DeRaDiffLoadAlignedPair": DeRaDiffLoadAlignedPair,
    "DeRaDiffMakePair": DeRaDiffMakePair,
    "DeRaDiffKSampler": DeRaDiffKSampler,
    "DeRaDiffGuider": DeRaDiffGuiderNode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DeRaDiffLoadAlignedPair": "Load Aligned Model Pair (DeRaDiff)",
    "DeRaDiffMakePair": "Make Aligned Model Pair (DeRaDiff)",
    "DeRaDiffKSampler": "DeRaDiff KSampler",
    "DeRaDiffGuider": "DeRaDiff Guider",
}

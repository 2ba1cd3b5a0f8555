from .pair_nodes import DeRaDiffLoadAlignedPair, DeRaDiffMakePair
from .sampler_nodes import DeRaDiffGuiderNode, DeRaDiffKSampler
from .schedule_nodes import DeRaDiffLambdaSchedule
from .search_nodes import DeRaDiffLambdaSearch, DeRaDiffLoadRewardModel, DeRaDiffRewardScore
from .sweep_nodes import DeRaDiffLambdaSweep, DeRaDiffRealignModel, DeRaDiffSweepGrid

NODE_CLASS_MAPPINGS = {
    "DeRaDiffLoadAlignedPair": DeRaDiffLoadAlignedPair,
    "DeRaDiffMakePair": DeRaDiffMakePair,
    "DeRaDiffKSampler": DeRaDiffKSampler,
    "DeRaDiffGuider": DeRaDiffGuiderNode,
    "DeRaDiffLambdaSchedule": DeRaDiffLambdaSchedule,
    "DeRaDiffLambdaSweep": DeRaDiffLambdaSweep,
    "DeRaDiffSweepGrid": DeRaDiffSweepGrid,
    "DeRaDiffRealignModel": DeRaDiffRealignModel,
    "DeRaDiffLoadRewardModel": DeRaDiffLoadRewardModel,
    "DeRaDiffRewardScore": DeRaDiffRewardScore,
    "DeRaDiffLambdaSearch": DeRaDiffLambdaSearch,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DeRaDiffLoadAlignedPair": "Load Aligned Model Pair (DeRaDiff)",
    "DeRaDiffMakePair": "Make Aligned Model Pair (DeRaDiff)",
    "DeRaDiffKSampler": "DeRaDiff KSampler",
    "DeRaDiffGuider": "DeRaDiff Guider",
    "DeRaDiffLambdaSchedule": "DeRaDiff λ Schedule",
    "DeRaDiffLambdaSweep": "DeRaDiff λ Sweep",
    "DeRaDiffSweepGrid": "DeRaDiff Sweep Grid",
    "DeRaDiffRealignModel": "DeRaDiff Realign Model",
    "DeRaDiffLoadRewardModel": "DeRaDiff Load Reward Model",
    "DeRaDiffRewardScore": "DeRaDiff Reward Score",
    "DeRaDiffLambdaSearch": "DeRaDiff λ Search",
}

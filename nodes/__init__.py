"""ComfyUI glue for NoiseCraft: thin V3 nodes over the ``noisecraft`` core.

Only imported when ComfyUI is present (see the package ``__init__``).
"""

from comfy_api.latest import ComfyExtension, io

from .nodes_npnet import NODES as NPNET_NODES
from .nodes_prompts import NODES as PROMPT_NODES
from .nodes_refine import NODES as REFINE_NODES
from .nodes_stability import NODES as STABILITY_NODES
from .nodes_teacher_filter import NODES as TEACHER_FILTER_NODES
from .nodes_train import NODES as TRAIN_REFINER_NODES
from .nodes_train_npnet import NODES as TRAIN_NPNET_NODES


class NoiseCraftExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*STABILITY_NODES, *NPNET_NODES, *REFINE_NODES, *TRAIN_REFINER_NODES, *TEACHER_FILTER_NODES,
                *TRAIN_NPNET_NODES, *PROMPT_NODES]


async def comfy_entrypoint() -> NoiseCraftExtension:
    return NoiseCraftExtension()

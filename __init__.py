"""ComfyUI-Streamline: exact memory-saving slicing, multi-GPU long-video sampling and memory monitoring
for video diffusion in ComfyUI. Registered through the comfy_api v0.0.2 (v3 schema) entry point."""
from comfy_api.v0_0_2 import ComfyExtension, io

from .nodes.cmd import CMDDecoder, CMDEncode, CMDLoader, CMDMotionSampler
from .nodes.dualparal import DualParalSampler
from .glue.prompt_recording import install_prompt_recording
from .nodes.memory_monitor import MemoryMonitor
from .nodes.planner import MemoryPlanner
from .nodes.slicing import FeatureSlicer, OperatorGrouper, VAESlicer
from .nodes.step_rehash import StepRehash

WEB_DIRECTORY = "./web"


class StreamlineExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FeatureSlicer, OperatorGrouper, VAESlicer, StepRehash, MemoryPlanner, MemoryMonitor, DualParalSampler,
                CMDLoader, CMDEncode, CMDDecoder, CMDMotionSampler]


async def comfy_entrypoint() -> StreamlineExtension:
    install_prompt_recording()  # prompts without a Memory Monitor run exactly as stock
    return StreamlineExtension()

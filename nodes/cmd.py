"""CMD nodes: load a CMD model, encode frames into a content frame + motion latent, decode them back,
and sample motion for a content frame from any image workflow."""
import os
from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import io

from ..core.cmd import CMDError, decode_clips, encode_clips, load_cmd, sample_clip_motion
from ..core.cmd.model import TRAINING_HINT

FOLDER = "cmd"
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "cmd"
CMDModelType = io.Custom("CMD_MODEL")
CMDMotion = io.Custom("CMD_MOTION")


def register_model_folder() -> None:
    """models/cmd/ in ComfyUI's models folder, then the weights this pack ships."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})
    folder_paths.add_model_folder_path(FOLDER, str(SHIPPED_WEIGHTS))


register_model_folder()  # when ComfyUI imports the pack, as its own model folders are set up at import


def _run(node: str, function, *args):
    try:
        return function(*args)
    except CMDError as error:
        raise ValueError(f"{node}: {error}") from None


class CMDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineCMDLoader", display_name="CMD Loader", category="Streamline/cmd",
            description="Loads a CMD content-motion video model (autoencoder + motion diffusion transformer) from "
                        "models/cmd/.",
            inputs=[io.Combo.Input("model_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A .safetensors written by scripts/train_cmd.py, in models/cmd/ (this "
                                           "pack ships cmd_sprites64: 8 frames of 64x64).")],
            outputs=[CMDModelType.Output(display_name="cmd_model")])

    @classmethod
    def validate_inputs(cls, model_name):
        if folder_paths.get_full_path(FOLDER, model_name) is None:
            where = ", ".join(folder_paths.get_folder_paths(FOLDER))
            return f"CMD Loader: no CMD weights named '{model_name}' in {where}: {TRAINING_HINT}."
        return True

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        import comfy.model_management
        model = _run("CMD Loader", load_cmd, folder_paths.get_full_path_or_raise(FOLDER, model_name))
        return io.NodeOutput(model.to(comfy.model_management.get_torch_device()))


class CMDEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineCMDEncode", display_name="CMD Encode", category="Streamline/cmd",
            description="Encodes video frames into one content frame (a per-pixel weighted average of the frames, "
                        "an ordinary image) and a small motion latent.",
            inputs=[CMDModelType.Input("cmd_model"),
                    io.Image.Input("frames", tooltip="Exactly the model's clip length (or several clips one after "
                                                     "another), at the model's size.")],
            outputs=[io.Image.Output(display_name="content"), CMDMotion.Output(display_name="motion")])

    @classmethod
    def execute(cls, cmd_model, frames) -> io.NodeOutput:
        content, motion = _run("CMD Encode", encode_clips, cmd_model, frames)
        return io.NodeOutput(content, {"motion": motion})


class CMDDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineCMDDecoder", display_name="CMD Content/Motion Decoder", category="Streamline/cmd",
            description="Decodes a content frame and a motion latent into video frames.",
            inputs=[CMDModelType.Input("cmd_model"),
                    io.Image.Input("content", tooltip="From CMD Encode or any image workflow, at the model's size: "
                                                      "one per motion latent, or one for all."),
                    CMDMotion.Input("motion")],
            outputs=[io.Image.Output(display_name="frames")])

    @classmethod
    def execute(cls, cmd_model, content, motion) -> io.NodeOutput:
        return io.NodeOutput(_run("CMD Content/Motion Decoder", decode_clips, cmd_model, content, motion["motion"]))


class CMDMotionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamlineCMDMotionSampler", display_name="CMD Motion Sampler", category="Streamline/cmd",
            description="Samples a motion latent for a content frame with CMD's motion diffusion transformer "
                        "(rectified flow, Euler steps).",
            inputs=[CMDModelType.Input("cmd_model"),
                    io.Image.Input("content", tooltip="The content frame(s): from CMD Encode or any image workflow."),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                    io.Int.Input("steps", default=20, min=1, max=1000)],
            outputs=[CMDMotion.Output(display_name="motion")])

    @classmethod
    def execute(cls, cmd_model, content, seed, steps) -> io.NodeOutput:
        import comfy.utils
        bar = comfy.utils.ProgressBar(steps)
        motion = _run("CMD Motion Sampler", sample_clip_motion, cmd_model, content, seed, steps,
                      lambda done, total: bar.update_absolute(done, total))
        return io.NodeOutput({"motion": motion})

"""The shipped example workflows (example_workflows/*.json, UI format, real model file names) as API
prompts, and those prompts on the tiny fixture models.

`ui_to_api` is a pure-Python version of what the frontend queues (`app.graphToPrompt`) for the graphs
the pack ships: linked inputs from `links`, widget values from `widgets_values` in the order of the
node's widget inputs (skipping the frontend-only values: a seed's `control_after_generate`, LoadImage's
`upload` button, widgets the pack's JS adds). tests/test_browser.py checks it against the frontend for
every shipped workflow.

`for_fixtures` changes only what a CPU with tiny random-weight models needs:
- text encoders: CLIPLoader + CLIPTextEncode -> Text Embedding (fixture) with the same text (umt5-xxl
  has no small config ComfyUI loads); CLIP vision: CLIPVisionLoader, or the CLIP_VISION output of
  ImageOnlyCheckpointLoader (the tiny SVD checkpoint carries none) -> Tiny CLIP Vision (fixture);
  the Wan 2.2 VAE (ComfyUI builds it at full size only, 699 M parameters) -> Tiny Wan 2.2 VAE (fixture).
  The other diffusion models, VAEs and checkpoints keep their official names: devkit/demo_assets.py
  saves tiny models under those names in the base folder, so those loaders are not swapped;
- FIXTURE_PROFILE: smaller frames, fewer frames and steps, DualParal on two CPU ranks, explicit chunk
  counts where "auto" would be a single chunk at the small size.
Everything else (nodes, links, the other widget values) is the shipped graph.
"""
import copy
import json
from pathlib import Path

from .comfy_env import REPO_ROOT

EXAMPLES_DIR = REPO_ROOT / "example_workflows"  # served by ComfyUI under Templates -> Extensions
EXAMPLE_INPUTS_DIR = EXAMPLES_DIR / "input"  # their input files: copied to ComfyUI's input/
API_DIR = REPO_ROOT / "api_workflows"  # API-format twins (not served)

VIRTUAL_NODES = {"Note", "MarkdownNote"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FRONTEND_ONLY_WIDGETS = {"upload", "preview"}  # LoadImage's upload button, Preview Any's display

WAN_TEXT_WIDTH = 4096
WAN22_VAE = "wan2.2_vae.safetensors"
WAN_I2V_CLIP_VISION_WIDTH = 1280  # Wan's image embedding reads ViT-H's penultimate hidden states

# Per shipped workflow: node id -> inputs changed for the tiny models on a CPU.
_WAN_SMALL = {"width": 64, "height": 48, "length": 9}
FIXTURE_PROFILE = {
    "wan2.1_t2v_1.3B_sliced": {"6": _WAN_SMALL, "7": {"steps": 3}, "14": {"strip_chunks": 4}},
    "wan2.1_t2v_1.3B_planner": {"6": _WAN_SMALL, "7": {"steps": 3}},
    "wan2.1_t2v_1.3B_dualparal_long": {"6": {**_WAN_SMALL, "length": 49}, "7": {"steps": 3, "devices": "cpu:2"}},
    "wan2.1_i2v_480p_sliced": {"6": {**_WAN_SMALL, "length": 5}, "7": {"steps": 2}, "14": {"strip_chunks": 2}},
    "wan2.2_t2v_A14B_sliced": {"6": _WAN_SMALL, "7": {"steps": 4, "end_at_step": 2},
                               "27": {"steps": 4, "start_at_step": 2}, "14": {"strip_chunks": 2}},
    "wan2.2_i2v_A14B_dualparal_long": {"6": {**_WAN_SMALL, "length": 25},
                                       "7": {"steps": 4, "low_noise_from_step": 2, "devices": "cpu:2"}},
    "svd_xt_img2vid_sliced": {"4": {"width": 64, "height": 64, "video_frames": 14}, "6": {"steps": 2},
                              "11": {"frame_chunks": 4, "strip_chunks": 3}},
    "svd_xt_img2vid_step_rehash": {"4": {"width": 64, "height": 64, "video_frames": 14}, "6": {"steps": 5},
                                   "11": {"frame_chunks": 4, "strip_chunks": 3}, "15": {"interval": 2}},
    "wan2.2_ti2v_5B_sliced": {"6": {"width": 64, "height": 64, "length": 9}, "7": {"steps": 3},
                              "12": {"frame_chunks": 2}, "14": {"strip_chunks": 2}},
    "cmd_reconstruction": {},
    "cmd_generation": {},
}


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))


def load_ui(name: str) -> dict:
    return json.loads((EXAMPLES_DIR / f"{name}.json").read_text())


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widget_names(node: dict, object_info: dict | None) -> list[str]:
    """The node's widget inputs in order: listed in its `inputs` by the frontends this pack exports
    with; read off the node definition (`/object_info`) for older files, e.g. ComfyUI's own templates."""
    listed = [i["name"] for i in node.get("inputs", []) if i.get("widget")]
    if listed or object_info is None:
        return listed
    definition = object_info[node["type"]]
    specs = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
    order = definition.get("input_order")
    names = (order.get("required", []) + order.get("optional", [])) if order else list(specs)
    return [name for name in names
            if isinstance(specs[name][0], list) or specs[name][0] in WIDGET_TYPES]


def _widget_values(node: dict, object_info: dict | None = None) -> dict:
    """Widget input name -> value, read off widgets_values in the order of the node's widget inputs."""
    values = list(node.get("widgets_values") or [])
    if isinstance(node.get("widgets_values"), dict):  # some nodes save widgets by name
        return dict(node["widgets_values"])
    names = _widget_names(node, object_info)
    found, position = {}, 0
    for name in names:
        if position >= len(values):
            break
        value = values[position]
        position += 1
        found[name] = value
        if (isinstance(value, int) and not isinstance(value, bool) and position < len(values)
                and values[position] in CONTROL_VALUES):
            position += 1  # control_after_generate: frontend only
    return found


MUTED, BYPASSED = 2, 4  # LiteGraph node modes: left out; left out with each output fed by its input of that type


def _source(nodes: dict, links: dict, link_id: int):
    """(node id, slot) feeding a link, through bypassed nodes (None where a bypassed node has no input
    of the output's type, or the source is muted)."""
    _, source, slot, *_, kind = links[link_id]
    node = nodes[source]
    if node.get("mode", 0) == MUTED:
        return None
    if node.get("mode", 0) == BYPASSED:
        feeding = next((i for i in node.get("inputs", []) if i.get("type") == kind and i.get("link") is not None),
                       None)
        return None if feeding is None else _source(nodes, links, feeding["link"])
    return str(source), slot


def ui_to_api(workflow: dict, object_info: dict | None = None) -> dict:
    """The API prompt the frontend queues for a UI workflow (no subgraphs): muted nodes left out,
    bypassed ones too with their consumers fed by their input of the same type. Files whose nodes do
    not list their widget inputs (older frontends) need the server's `object_info`."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ValueError("subgraphs are not converted")
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        widgets = _widget_values(node, object_info)
        inputs = {name: value for name, value in widgets.items() if name not in FRONTEND_ONLY_WIDGETS}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                source = _source(nodes, links, slot["link"])
                if source is not None:
                    inputs[slot["name"]] = list(source)
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


def consumers(prompt: dict, node_id: str, slot: int | None = None):
    for target_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == node_id and (slot is None or value[1] == slot):
                yield target_id, name


def bypass(prompt: dict, class_types) -> dict:
    """The prompt with every node of `class_types` left out and its consumers wired to its first
    linked input (the pack's MODEL -> MODEL, VAE -> VAE and pass-through nodes)."""
    prompt = copy.deepcopy(prompt)
    for node_id in [k for k, n in prompt.items() if n["class_type"] in class_types]:
        source = next(v for v in prompt[node_id]["inputs"].values() if isinstance(v, list))
        for target_id, name in list(consumers(prompt, node_id, 0)):
            prompt[target_id]["inputs"][name] = list(source)
        del prompt[node_id]
    return prompt


PACK_WRAPPERS = ("StreamlineFeatureSlicer", "StreamlineOperatorGrouper", "StreamlineVAESlicer")


def _next_id(prompt: dict) -> str:
    return str(max(int(k) for k in prompt) + 1)


def for_fixtures(prompt: dict, name: str) -> dict:
    """The shipped prompt on the tiny fixture models (see the module docstring)."""
    prompt = swap_encoders(prompt)
    for node_id, changes in FIXTURE_PROFILE[name].items():
        prompt[node_id]["inputs"].update(changes)
    return prompt


def swap_encoders(prompt: dict) -> dict:
    """Text encoders, CLIP vision and the Wan 2.2 VAE -> the fixture nodes (see the module docstring)."""
    prompt = copy.deepcopy(prompt)
    i2v = any(n["class_type"] == "WanImageToVideo" for n in prompt.values())
    for node_id, node in list(prompt.items()):
        kind = node["class_type"]
        if kind == "CLIPTextEncode" and prompt[node["inputs"]["clip"][0]]["class_type"] == "CLIPLoader":
            prompt[node_id] = {"class_type": "StreamlineFixtureTextEmbedding", "_meta": node["_meta"],
                               "inputs": {"text": node["inputs"]["text"], "tokens": 16, "width": WAN_TEXT_WIDTH}}
        elif kind == "CLIPVisionLoader":
            inputs = {"seed": 0, **({"hidden_size": WAN_I2V_CLIP_VISION_WIDTH} if i2v else {})}
            prompt[node_id] = {"class_type": "StreamlineFixtureTinyCLIPVision", "_meta": node["_meta"],
                               "inputs": inputs}
        elif kind == "VAELoader" and node["inputs"]["vae_name"] == WAN22_VAE:
            prompt[node_id] = {"class_type": "StreamlineFixtureTinyWan22VAE", "_meta": node["_meta"],
                               "inputs": {"seed": 0}}
        elif kind == "ImageOnlyCheckpointLoader" and list(consumers(prompt, node_id, 1)):
            clip_vision = _next_id(prompt)
            prompt[clip_vision] = {"class_type": "StreamlineFixtureTinyCLIPVision", "inputs": {"seed": 0},
                                   "_meta": {"title": "Tiny CLIP Vision (fixture)"}}
            for target_id, input_name in list(consumers(prompt, node_id, 1)):
                prompt[target_id]["inputs"][input_name] = [clip_vision, 0]
    for node_id in [k for k, n in prompt.items() if n["class_type"] == "CLIPLoader"]:
        if not list(consumers(prompt, node_id)):
            del prompt[node_id]
    return prompt


def example_prompt(name: str, fixtures: bool = True, stock: bool = False) -> dict:
    """A shipped workflow as an API prompt, on the fixtures unless `fixtures=False`; `stock=True`
    leaves out the slicing nodes (Feature Slicer, Operator Grouper, VAE Slicer)."""
    prompt = ui_to_api(load_ui(name))
    if fixtures:
        prompt = for_fixtures(prompt, name)
    return bypass(prompt, PACK_WRAPPERS) if stock else prompt

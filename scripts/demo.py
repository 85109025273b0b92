"""The demo: starts a headless ComfyUI with this pack, queues the shipped example workflows
(example_workflows/, converted to API prompts by devkit/workflows.py: text encoders and CLIP vision
swapped for fixtures, tiny random-weight models under the official file names, small sizes) through
its HTTP API, and says where the outputs went. Then sprite videos from the models trained here
(models/sprites: Wan 2.1 text to video from prompts, SVD image to video from held-out first frames),
each sampled stock and through Step Rehash, with their motion measures."""
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.comfy_env import REPO_ROOT  # noqa: E402
from devkit.comfy_server import ComfyServer  # noqa: E402
from devkit.demo_assets import prepare_base_dir  # noqa: E402
from devkit.sprite_videos import prompt_of  # noqa: E402
from devkit.sprite_workflows import (SPRITE_MODELS_DIR, SVD_FIRST_FRAMES, link_sprite_models, saved_frames,  # noqa: E402
                                     sprite_prompt, svd_sprite_prompt)
from devkit.video_metrics import motion_measures  # noqa: E402
from devkit.workflows import example_names, example_prompt  # noqa: E402

DEMO_DIR = REPO_ROOT / "demo_output"
SPRITE_PROMPTS = ("disc moving right", "square moving up", "triangle moving left", "disc moving down")
REHASH = {"interval": 3, "full_first_steps": 2, "full_last_steps": 1}
SPRITE_RUNS = {"stock": None, "step_rehash": {**REHASH, "shallow_blocks": 1}}  # Wan: blocks 1-2 of 4 reused
SVD_RUNS = {"stock": None, "step_rehash": {**REHASH, "shallow_blocks": 2}}  # SVD: the 8x8 level reused
log = logging.getLogger("streamline.demo")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    prepare_base_dir(DEMO_DIR)
    failures = 0
    with ComfyServer(DEMO_DIR) as server:
        log.info("headless ComfyUI at %s (log: %s)", server.url, server.log_path)
        for name in example_names():
            started = time.monotonic()
            result = server.run(example_prompt(name))
            seconds = time.monotonic() - started
            if result.status != "success":
                failures += 1
                log.error("%s failed: %s", name, result.error)
                continue
            log.info("%s ran in %.1f s", name, seconds)
            for path in result.files(server.output_dir):
                log.info("  output: %s", path)
            for node_output in result.outputs.values():
                for text in node_output.get("text", []):
                    log.info("  memory: %s", text.replace("\n", "; "))
        failures += sprite_videos(server)
    log.info("all outputs are under %s", server.output_dir)
    return 1 if failures else 0


def sprite_videos(server: ComfyServer) -> int:
    """Each sprite prompt (Wan) and first frame (SVD), stock and through Step Rehash, with the same seed;
    returns the failures."""
    if not link_sprite_models(server.models_dir):
        log.error("sprite models missing from %s (scripts/train_video_models.py and scripts/train_svd_sprites.py "
                  "make them)", SPRITE_MODELS_DIR)
        return 1
    jobs = [(f"wan_{text.replace(' ', '_')}", text, lambda prefix, rehash, text=text, seed=seed:
             sprite_prompt(text, seed, prefix, rehash), SPRITE_RUNS) for seed, text in enumerate(SPRITE_PROMPTS)]
    jobs += [(f"svd_{Path(image).stem}", prompt_of(clip_seed), lambda prefix, rehash, image=image, seed=seed:
              svd_sprite_prompt(image, seed, prefix, rehash), SVD_RUNS)
             for seed, (image, clip_seed) in enumerate(SVD_FIRST_FRAMES.items())]
    failures = 0
    for name, text, make_prompt, runs in jobs:
        for label, rehash in runs.items():
            result = server.run(make_prompt(f"sprites/{name}_{label}", rehash))
            if result.status != "success":
                failures += 1
                log.error("sprite video %s (%s) failed: %s", name, label, result.error)
                continue
            measures = motion_measures(saved_frames(result, server.output_dir), [text])
            log.info("sprite video %s (%s), %r: moves %s, sprite kept in %.0f %% of frames, centre smoothness "
                     "%.2f px -> %s", name, label, text,
                     "the prompt's way" if measures["direction_accuracy"] else "the wrong way",
                     100 * measures["survival"], measures["smoothness_px"],
                     [p for p in result.files(server.output_dir) if p.suffix == ".webp"][0])
    return failures


if __name__ == "__main__":
    sys.exit(main())

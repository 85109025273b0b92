"""The demo: starts a headless ComfyUI with this pack, queues the shipped example workflows
(example_workflows/, converted to API prompts by devkit/workflows.py: text encoders and CLIP vision
swapped for fixtures, tiny random-weight models under the official file names, small sizes) through
its HTTP API, and says where the outputs went."""
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.comfy_env import REPO_ROOT  # noqa: E402
from devkit.comfy_server import ComfyServer  # noqa: E402
from devkit.demo_assets import prepare_base_dir  # noqa: E402
from devkit.workflows import example_names, example_prompt  # noqa: E402

DEMO_DIR = REPO_ROOT / "demo_output"
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
    log.info("all outputs are under %s", server.output_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

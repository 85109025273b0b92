"""Runs a real headless ComfyUI (`main.py --cpu --listen 127.0.0.1`) in its own base folder with this
pack and the fixture nodes linked into custom_nodes/, and talks to it over its HTTP API."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .comfy_env import REPO_ROOT, comfyui_dir

FIXTURE_NODES = Path(__file__).resolve().parent / "fixture_nodes"


class PromptRejected(Exception):
    """The server refused a prompt at validation; `.body` holds its `error` and `node_errors`."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


@dataclass
class PromptResult:
    prompt_id: str
    status: str
    outputs: dict
    messages: list = field(default_factory=list)

    def files(self, output_dir: Path) -> list[Path]:
        """Every file the prompt's output nodes reported (images, animated images, videos)."""
        found = []
        for node_output in self.outputs.values():
            for items in node_output.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item and item.get("type") == "output":
                        found.append(Path(output_dir) / item.get("subfolder", "") / item["filename"])
        return found

    @property
    def error(self) -> dict | None:
        for name, data in self.messages:
            if name == "execution_error":
                return data
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, pack_folder_name: str = "comfyui-streamline", extra_args=()):
        self.base_dir = Path(base_dir)
        self.pack_folder_name = pack_folder_name
        self.extra_args = list(extra_args)
        self.port = None
        self.process = None
        self.log_path = self.base_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def _prepare_base_dir(self):
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for name, target in ((self.pack_folder_name, REPO_ROOT), ("streamline_fixture_nodes", FIXTURE_NODES)):
            link = custom_nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        for sub in ("input", "output", "temp", "user", "models"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():  # a returning user: the frontend opens on the canvas, not on Templates
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def start(self, timeout: float = 180) -> "ComfyServer":
        self._prepare_base_dir()
        self.port = free_port()
        command = [sys.executable, str(comfyui_dir() / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
                   "--base-directory", str(self.base_dir),
                   "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=comfyui_dir(), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /system_stats within {timeout}s:\n{self.log()}")

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        response = requests.post(f"{self.url}/prompt", json=body, timeout=30)
        if response.status_code == 400:
            raise PromptRejected(response.json())
        response.raise_for_status()
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> PromptResult:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()}")
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                status = entry["status"]
                return PromptResult(prompt_id, status.get("status_str", ""), entry.get("outputs", {}),
                                    status.get("messages", []))
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> PromptResult:
        return self.wait(self.queue(prompt), timeout)

    def put_input(self, source: Path) -> str:
        """Copies a file into the server's input folder and returns the name LoadImage takes."""
        shutil.copy(source, self.base_dir / "input" / Path(source).name)
        return Path(source).name

"""What every benchmark shares: where results go, the machine they ran on, JSON and plot output."""
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_machine() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_json(name: str, data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def pyplot():
    """matplotlib.pyplot without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def flop_counter():
    """FlopCounterMode with a formula for the CPU flash-attention kernel SDPA takes on fake CPU
    tensors (torch counts only the GPU kernels)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={
        cpu_attention: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)})


def peak_bars(name: str, labels: list, peaks: list, title: str, xlabel: str = "activation peak (GiB)",
              size=(9, 3.6)) -> None:
    """bench/results/NAME.png: one horizontal bar per label (first on top), stock rows in red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size)
    ax.barh(labels[::-1], peaks[::-1], color=["#c44e52" if "stock" in label else "#4c72b0" for label in labels[::-1]])
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)

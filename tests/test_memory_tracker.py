"""The dispatch-level live-storage tracker counts what a computation keeps alive at its worst moment."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

MIB = 1024 ** 2


def _chain(x):
    y = x * 2          # +4 MiB
    z = y + 1          # +4 MiB (peak: y and z alive)
    del y
    return z.sum()


def test_peak_counts_intermediates_alive_at_once(pack):
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    x = torch.ones(1024, 1024)
    with LiveStorageTracker() as tracker:
        result = _chain(x)
    assert tracker.peak == 8 * MIB
    assert tracker.current == result.untyped_storage().nbytes()


def test_views_share_their_storage_and_release_with_the_last_one(pack):
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    with LiveStorageTracker() as tracker:
        base = torch.zeros(256, 1024)  # 1 MiB
        view = base[:128].t()
        del base
        assert tracker.current == MIB  # the view keeps the storage alive
        del view
    assert tracker.current == 0 and tracker.peak == MIB


def test_views_of_storage_that_existed_before_cost_nothing(pack):
    """A linear layer's weight transpose or a parameter returned by .to() allocates nothing."""
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    weight = torch.nn.Parameter(torch.ones(1024, 1024))  # 4 MiB
    x = torch.ones(8, 1024)
    with torch.inference_mode(), LiveStorageTracker() as tracker:
        same = weight.to(dtype=torch.float32)
        y = torch.nn.functional.linear(x, weight)
    assert same is weight
    assert tracker.peak == tracker.current == y.untyped_storage().nbytes() == 8 * 1024 * 4


def test_counts_full_size_shapes_under_fake_tensors(pack):
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    with FakeTensorMode():
        video = torch.empty(2, 320, 14, 72, 128, dtype=torch.float16)
        weight = torch.empty(320, 320, 3, 1, 1, dtype=torch.float16)
        with LiveStorageTracker() as tracker:
            tracker.track_existing(video)
            out = torch.nn.functional.conv3d(video, weight, padding=(1, 0, 0))
    assert tracker.peak == 2 * video.numel() * 2
    assert out.shape == video.shape


def test_reproduces_the_independent_stock_svd_unet_measurement(pack):
    """shared/reference.md measured stock SVD UNet 14f 576x1024 fp16 CFG activations at 4.19 GiB."""
    import sys
    sys.path.insert(0, str(__import__("conftest").REPO_ROOT / "bench"))
    from stock_peaks import svd_unet
    from comfyui_streamline.core.memory.tracker import LiveStorageTracker

    peak, weights = svd_unet(14, LiveStorageTracker)
    assert round(peak / 1024 ** 3, 2) == 4.19
    assert round(weights / 1024 ** 3, 2) == 2.84

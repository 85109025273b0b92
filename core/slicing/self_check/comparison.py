"""Whether a probe's sliced output equals stock's: max abs difference within a tolerance of the
stock output's scale."""
import torch

EXACT_TOLERANCE = 1e-5  # fp32 / fp64: max abs difference <= this x the stock output's max abs value
# fp16 / bf16, and fp32 where CUDA may compute it in TF32 (10-bit mantissa): the order of two stock
# runs on different kernels
LOW_PRECISION_TOLERANCE = 1e-2


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "to_tuple"):  # diffusers' BaseOutput
        return _tensors(value.to_tuple())
    return []


def tolerance(stock: torch.Tensor, convolutions: bool) -> float:
    if stock.dtype in (torch.float32, torch.float64):
        tf32 = stock.device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                                or (convolutions and torch.backends.cudnn.allow_tf32))
        if not tf32:
            return EXACT_TOLERANCE
    return LOW_PRECISION_TOLERANCE


def compare(stock, sliced, convolutions: bool = True) -> tuple:
    """(whether `sliced` matches `stock` within tolerance, a description of the largest difference)."""
    expected, got = _tensors(stock), _tensors(sliced)
    if len(expected) != len(got):
        return False, f"{len(got)} output tensors where stock gives {len(expected)}"
    worst = (0.0, 0.0, EXACT_TOLERANCE)
    for a, b in zip(expected, got):
        if a.shape != b.shape:
            return False, f"output shape {tuple(b.shape)} where stock gives {tuple(a.shape)}"
        limit = tolerance(a, convolutions)
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b.to(a.device)):
                return False, "integer outputs differ"
            continue
        a, b = a.detach().double(), b.detach().to(a.device).double()
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)):
            return False, "non-finite values where stock has finite ones (or the reverse)"
        if not finite.any():
            continue
        difference = (a - b).abs()[finite].max().item()
        scale = a.abs()[finite].max().item()
        relative = difference / scale if scale > 0 else difference
        if relative > limit:
            return False, (f"max abs difference {difference:.2e} = {relative:.1e} of the output's scale {scale:.2e}, "
                           f"tolerance {limit:.0e}")
        worst = max(worst, (relative, scale, limit))
    return True, f"max abs difference {worst[0]:.1e} of the output's scale, tolerance {worst[2]:.0e}"


"""DualParal: block-wise, layer-pipelined long-video sampling of Wan DiT models over several ranks."""
from .cluster import check_allowed, cluster_address, read_key
from .pipeline import RankStats, Sampling
from .processes import WorkerError
from .runner import (DualParalRequest, expert_phases, parse_devices, rank_weight_bytes, run_in_process, run_in_workers,
                     run_on_cluster)
from .samplers import SAMPLERS, check_sampler, flow_spec
from .schedule import BlockPlan, DualParalError, layer_ranges

__all__ = ["SAMPLERS", "BlockPlan", "DualParalError", "DualParalRequest", "RankStats", "Sampling", "check_allowed",
           "check_sampler", "cluster_address", "expert_phases", "flow_spec", "layer_ranges", "parse_devices",
           "rank_weight_bytes", "read_key", "run_in_process", "run_in_workers", "run_on_cluster", "WorkerError"]

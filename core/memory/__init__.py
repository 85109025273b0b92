"""Memory: readings (RAM, torch.cuda, NVML), the Memory Monitor's recording and chart, the live
tensor-storage tracker, and the dry-run peak predictor the Memory Planner uses."""

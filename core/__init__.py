"""Host-agnostic torch engine of ComfyUI-Streamline: nothing here imports ComfyUI."""

"""ComfyUI-facing nodes: validate inputs, call core/, return results."""

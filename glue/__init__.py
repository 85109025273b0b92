"""ComfyUI glue the nodes share: the work on ComfyUI's own objects (ModelPatcher, VAE, conditioning,
the prompt executor) between a node's schema and the host-agnostic engine in core/."""

"""Development kit shared by tests/, bench/ and the demo: ComfyUI bootstrap, real model fixtures with
random weights, the fixture node pack and the headless-server harness. Not loaded by ComfyUI."""

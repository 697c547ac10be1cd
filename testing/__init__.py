"""Host tooling shared by the tests, the demo and the benchmarks: locate ComfyUI, build a tiny
random-weight checkpoint, run a headless ComfyUI server. Not used by the nodes themselves."""

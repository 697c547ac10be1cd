"""The method as a host-agnostic torch core: every rule of the method once (regions, gating, token masks,
boosting, capture, the refinement loop, inversion, windows, stage construction and validation, the typed run
record). It imports no host (``comfy``, ``diffusers``) and nothing from ``hosts/``, ``nodes/`` or ``runner/``;
the hosts in ``hosts/`` bind it to ComfyUI and diffusers. Import each name from its module."""

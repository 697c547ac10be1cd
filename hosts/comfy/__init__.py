"""The ComfyUI host: attention patches on a clone of the ModelPatcher (:mod:`.patch`), the UNet walk
(:mod:`.unet_layout`), ComfyUI's sampler and guider machinery, and importing ComfyUI outside ComfyUI
(:mod:`.standalone`). The only place that knows ComfyUI's patch keys."""

"""The diffusers host: attention processors (:mod:`.processors`), stage builders for diffusers models
(:mod:`.stages`) and img2img with the method's stages (:mod:`.pipeline`). ComfyUI users never need it."""

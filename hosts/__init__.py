"""Hosts: glue that binds the method's core (:mod:`..attention`) to a diffusion framework. One sub-package per
host; each holds only glue (patching, wrappers, processors), never a rule of the method."""

"""DreamBooth trainer for Stable Diffusion: torchrun + DeepSpeed ZeRO.

Importing the package is cheap and torch-free (`trainer.config` is shared with the
operator); the heavy modules are imported where they are used.
"""

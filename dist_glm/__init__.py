"""dist_glm: DeepSpeed-based distributed fine-tuning for the GLM family.

The package is a library; the commands are `launch/*.py` and the `dist-glm-*` console scripts."""

__version__ = "0.1.0"

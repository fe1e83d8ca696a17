"""dist_glm: DeepSpeed-based distributed fine-tuning for the GLM family.

Install torch first (the Makefile's `setup` target picks the CUDA or CPU build for this machine),
then `pip install -c constraints.txt -e .[dev]` for the exact versions CI tested.

The ranges below stop at the newest release that CI has tested (constraints.txt pins it); they widen
only after `make test-latest` passes on the newer one. That target sets DIST_GLM_LATEST=1, which drops
the upper bounds so the newest releases install.
"""

import os
import re

from setuptools import find_packages, setup

REQUIREMENTS = [
    "torch>=2.4,<2.14",
    "deepspeed>=0.17,<0.20",
    # 5.2x changed Cache.update's keyword (P-tuning's read-only prefix cache accepts both spellings).
    "transformers>=5.0,<5.25",
    "peft>=0.17,<0.22",
    "accelerate>=1.0,<1.17",
    "bitsandbytes>=0.45,<0.51",  # QLoRA; ships CPU and CUDA kernels
    "datasets>=3.0,<5.3",  # csv and parquet input
    "tokenizers>=0.21,<0.24",
    # THUDM's published ChatGLM layouts keep their vocabulary in tokenizer.model (models/chatglm.py): sentencepiece
    # (ChatGLM2/3) read through protobuf, tiktoken ranks (glm-4-9b-chat).
    "sentencepiece>=0.2,<0.3",
    "protobuf>=4",
    "tiktoken>=0.7,<0.15",
    "safetensors>=0.4,<0.9",
    "tensorboard>=2.15",
    "matplotlib>=3.7",  # plot_loss and launch/plot.py (Agg backend, no display needed)
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "jieba>=0.42",
    "ninja>=1.11",  # DeepSpeed JIT-builds its CPU Adam (ZeRO-Offload) with it
    "numpy",
    "fastapi>=0.110",  # launch/serve.py: the OpenAI-compatible API
    "uvicorn>=0.29",
    "pydantic>=2",
    "jsonschema>=4.18,<5",  # serve.py --tool_call_arguments=validate: a call's arguments against its tool's schema
]
if os.environ.get("DIST_GLM_LATEST"):
    REQUIREMENTS = [re.sub(r",<[^,;\s]+", "", r) for r in REQUIREMENTS]

setup(
    name="dist_glm",
    version="0.1.0",
    description="DeepSpeed-based distributed fine-tuning for the GLM family (GLM-4, GLM-4-0414, MoE GLMs, ChatGLM2/3)",
    python_requires=">=3.10",
    packages=find_packages(include=["dist_glm", "dist_glm.*"]),
    install_requires=REQUIREMENTS,
    extras_require={
        # wandb is in dev so that CI runs its offline test; swanlab is not: it declares protobuf<7, which
        # conflicts with the pinned protobuf (docs/training.md says how to install it anyway).
        "dev": ["pytest>=8", "ruff>=0.6", "openai>=1.40", "httpx>=0.27", "wandb>=0.19,<0.32"],
        # Experiment trackers for report_to (off by default): pip install -e .[wandb] / .[swanlab]. Tested:
        # the releases constraints.txt pins (wandb 0.31.0, swanlab 0.10.3).
        "wandb": ["wandb>=0.19,<0.32"],
        "swanlab": ["swanlab>=0.10,<0.11"],
        # serve.py --tool_call_arguments=constrained. On a CPU-only Linux machine install it with
        # `pip install --no-deps xgrammar apache-tvm-ffi`: its wheel asks for triton (1 GB), used on GPUs only.
        "constrained": ["xgrammar>=0.2.9,<0.3"],
    },
    entry_points={
        "console_scripts": [
            "dist-glm-train=dist_glm.cli:train_main",
            "dist-glm-plan=dist_glm.cli:plan_main",
            "dist-glm-evaluate=dist_glm.cli:evaluate_main",
            "dist-glm-chat=dist_glm.cli:chat_main",
            "dist-glm-export=dist_glm.cli:export_main",
            "dist-glm-serve=dist_glm.cli:serve_main",
            "dist-glm-prepare=dist_glm.cli:prepare_main",
            "dist-glm-distill-cache=dist_glm.cli:distill_cache_main",
            "dist-glm-ref-cache=dist_glm.cli:ref_cache_main",
            "dist-glm-distill-generate=dist_glm.cli:distill_generate_main",
            "dist-glm-doctor=dist_glm.cli:doctor_main",
            "dist-glm-plot=dist_glm.cli:plot_main",
            "dist-glm-supervise=dist_glm.cli:supervise_main",
        ]
    },
)

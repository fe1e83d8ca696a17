"""The peers, each in its own venv under the cache folder, at pinned versions.

Each venv first gets torch from local disk without dependencies (`--no-deps torch==X`), so pip never
swaps it for a CUDA build, then the peer's pins are resolved against it. A marker file is written
only after a complete install, so a venv is reused as it is, and an interrupted install is redone.
A peer that cannot install is skipped; its reason goes into the table.
"""

import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    name: str
    label: str  # the column heading in the table
    # Each entry is one complete pin set; the first that installs is used (LLaMA-Factory: the closest 0.9.x).
    candidates: tuple[tuple[str, ...], ...]
    check: str  # python that must import in the venv for the install to count
    cpu_fixup: bool = False  # drop the CUDA-only compiled parts of torchvision/torchaudio on a CPU torch
    venv: str = ""  # another peer's venv to run in (the same pins), instead of one of its own

    @property
    def home(self) -> str:
        return self.venv or self.name


# PyPI's torchvision and torchaudio wheels are CUDA builds: next to a CPU torch their compiled parts do
# not load (libc10_cuda.so), which breaks `import transformers` (torchvision) and `import llamafactory`
# (mm_plugin imports torchaudio at the top). Text SFT uses neither, so on a CPU torch torchvision is
# removed (transformers runs without it) and torchaudio keeps only its Python part, which imports.
CPU_FIXUP = """
import importlib.util, pathlib, subprocess, sys, torch
if torch.version.cuda is None:
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)
    spec = importlib.util.find_spec("torchaudio")
    if spec:
        for lib in (pathlib.Path(spec.origin).parent / "lib").glob("*.so"):
            lib.unlink()
"""


PEERS = {
    p.name: p
    for p in (
        Peer(
            "hf",
            "HF Trainer",
            (("transformers==5.24.0", "accelerate==1.16.0", "peft==0.21.2", "safetensors"),),
            "import transformers, accelerate, peft",
        ),
        # What a user writes without a trainer: forward with labels (HF's loss on the full logits), backward,
        # clipping, torch.optim.AdamW. The memory goal's yardstick (issue 27); it runs in HF Trainer's venv.
        Peer(
            "hf_loop",
            "plain HF loop (no trainer)",
            (("transformers==5.24.0", "accelerate==1.16.0", "peft==0.21.2", "safetensors"),),
            "import transformers, accelerate, peft",
            venv="hf",
        ),
        Peer(
            "trl",
            "TRL (SFTTrainer; DPOTrainer for DPO)",
            (("trl==1.16.0", "transformers==5.24.0", "accelerate==1.16.0", "peft==0.21.2", "datasets"),),
            "import trl, peft",
        ),
        Peer(
            "llamafactory",
            "LLaMA-Factory",
            (("llamafactory==0.9.5",), ("llamafactory==0.9.4",), ("llamafactory==0.9.3",)),
            "import llamafactory.train.tuner",
            cpu_fixup=True,
        ),
    )
}


def venv_python(cache: Path, peer: Peer) -> Path:
    return cache / "venvs" / peer.home / "bin" / "python"


def installed_pins(cache: Path, peer: Peer) -> str | None:
    """The pins of a complete install (the marker's text), or None."""
    marker = cache / "venvs" / peer.home / ".installed"
    return marker.read_text().strip() if marker.exists() else None


def ensure_venv(cache: Path, peer: Peer, log=print) -> tuple[Path | None, str]:
    """(the venv's python, the pins in it) or (None, why it could not install)."""
    done = installed_pins(cache, peer)
    if done is not None:
        return venv_python(cache, peer), done
    home, python = cache / "venvs" / peer.home, str(venv_python(cache, peer))
    logfile = cache / "venvs" / f"{peer.home}.log"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [python, "-m", "pip", "install", "-q"]
    reason = "no pin set installed"
    for pins in peer.candidates:
        log(f"installing {peer.label} ({' '.join(pins)}) into {home} (log: {logfile})")
        shutil.rmtree(home, ignore_errors=True)  # each candidate in a fresh venv: no leftovers of the last
        venv.create(home, with_pip=True)
        steps = [pip + ["--no-deps", TORCH], pip + [TORCH, *pins]]
        steps += [[python, "-c", CPU_FIXUP]] if peer.cpu_fixup else []
        steps += [[python, "-c", peer.check]]
        with open(logfile, "a", encoding="utf-8") as out:
            failed = next((s for s in steps if subprocess.run(s, stdout=out, stderr=out, env=env).returncode), None)
        if failed is None:
            (home / ".installed").write_text(" ".join(pins) + "\n")
            return venv_python(cache, peer), " ".join(pins)
        reason = f"`{' '.join(failed[-2:])[:80]}` failed (see {logfile})"
    return None, reason


def peer_version_report(python: Path) -> str:
    """The versions the peer actually got (transformers is what runs the model's forward)."""
    code = (
        "import importlib.metadata as m\n"
        "for n in ('torch', 'transformers', 'trl', 'peft', 'llamafactory'):\n"
        "    try: print(n, m.version(n))\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return ", ".join(proc.stdout.splitlines())


def ours_versions() -> str:
    import importlib.metadata as m

    return (
        ", ".join(f"{n} {m.version(n)}" for n in ("torch", "transformers", "deepspeed", "peft"))
        + f", python {sys.version.split()[0]}"
    )


# What a peer does when the benchmark does not say (its own defaults, read from the installed code): the
# optimizer implementation and whether it checkpoints activations.
DEFAULTS_CODE = {
    "hf": "from transformers import TrainingArguments as A\n"
    "a = A(output_dir='unused', use_cpu=True)\nprint(getattr(a.optim, 'value', a.optim), a.gradient_checkpointing)",
    "llamafactory": "from transformers import TrainingArguments as A\n"
    "from llamafactory.hparams import ModelArguments as M\na = A(output_dir='unused', use_cpu=True)\n"
    "print(getattr(a.optim, 'value', a.optim), not M.__dataclass_fields__['disable_gradient_checkpointing'].default)",
}
# torch.optim.AdamW as written (foreach=None, fused=None) takes the single-tensor loop on CPU tensors (torch
# picks foreach only for CUDA), what transformers calls adamw_torch; the plain loop checkpoints nothing.
DEFAULTS_CODE["hf_loop"] = (
    "import torch\nfrom torch.optim.optimizer import _default_to_fused_or_foreach as d\n"
    "fused, foreach = d([torch.zeros(1)], False, False)\n"
    "print('adamw_torch_fused' if fused else 'adamw_torch_foreach' if foreach else 'adamw_torch', False)"
)
DEFAULTS_CODE["trl"] = DEFAULTS_CODE["hf"].replace(
    "from transformers import TrainingArguments as A", "from trl import SFTConfig as A"
)


def peer_defaults(python: Path, name: str) -> dict:
    """{"optim": str, "gradient_checkpointing": bool} as the installed peer defaults them."""
    proc = subprocess.run([str(python), "-c", DEFAULTS_CODE[name]], capture_output=True, text=True)
    if proc.returncode:
        return {"optim": f"unknown ({proc.stderr.strip().splitlines()[-1][:80] if proc.stderr.strip() else '?'})",
                "gradient_checkpointing": None}  # fmt: skip
    optim, gc = proc.stdout.split()[-2:]
    return {"optim": optim, "gradient_checkpointing": gc == "True"}

"""What this environment is, next to what CI tested: `python -m dist_glm.runtime.doctor` (or `make doctor`).

Prints the versions that matter, whether each is the one in constraints.txt, the accelerator, the CPU
features that decide which bitsandbytes kernels run, and known-bad combinations with their fix.
Training prints the one-line form (`summary_line`) at start-up, so every log says what it ran on.

    python -m dist_glm.runtime.doctor            # the full report; exit 0 (a report, not a gate)
    python -m dist_glm.runtime.doctor --brief    # the one line training prints
"""

import importlib.metadata
import logging
import os
import sys
import warnings
from pathlib import Path

CONSTRAINTS_FILE = Path(__file__).resolve().parents[2] / "constraints.txt"
# The packages whose version changes what training computes or whether it runs.
PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "tokenizers",
    "datasets",
    "safetensors",
    "setuptools",
)


def quiet_known_noise() -> None:
    """Silence what a user cannot act on; keep every warning they can. Called by the entry points
    before the libraries load."""
    # bitsandbytes on an AVX512-BF16 CPU tries to fetch a faster 4-bit kernel from the Hugging Face Hub
    # (`kernels` package) at import and warns on every run when it cannot; its own CPU kernel is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates: the caller is PEFT.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # In a log file (Slurm, nohup) the Hub's and transformers' tqdm bars ("Writing model shards") are `\r`
    # updates that pile up into one unreadable line; both read this before they are imported.
    if not sys.stdout.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def tested_versions(path: Path = CONSTRAINTS_FILE) -> dict[str, str]:
    """name -> version from constraints.txt (lower-cased names, as pip compares them)."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version
    return pins


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_rows(tested: dict[str, str] | None = None) -> list[tuple[str, str | None, str | None, bool]]:
    """(package, installed, tested, whether they agree); a local build label (+cpu, +cu128) is the same
    release."""
    tested = tested_versions() if tested is None else tested
    rows = []
    for name in PACKAGES:
        have, want = installed_version(name), tested.get(name)
        rows.append((name, have, want, have is not None and want is not None and have.split("+")[0] == want))
    return rows


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def slow_bf16_warning() -> str | None:
    """A warning for bf16 training on a CPU without native bf16 arithmetic (AVX512-BF16 or AMX-BF16): it
    is emulated there, about 50x slower than fp32 (3.7 s against 0.07 s a step on the demo)."""
    import torch

    if torch.cuda.is_available():
        return None
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return (
        "WARNING: bf16=true on a CPU without native bf16 (no AVX512-BF16 or AMX-BF16): bf16 is emulated here, "
        "about 50x slower than fp32; pass --bf16=false to train in fp32 (recipes written for GPUs set bf16: true)"
    )


def accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (use fp32)"
        return f"{torch.cuda.device_count()} x {', '.join(names)}, CUDA {torch.version.cuda}, {bf16}"
    return f"CPU only ({os.cpu_count()} cores; DeepSpeed's CPU accelerator, gloo)"


def bitsandbytes_cpu_path(flags: set[str]) -> str:
    if "avx512_bf16" in flags:
        return (
            "AVX512-BF16: bitsandbytes would repack 4-bit weights into a bf16 inference layout; dist_glm "
            "turns that off (it breaks small shapes and changes the numbers), generic CPU kernels run"
        )
    if "avx512f" in flags:
        return "AVX512 without BF16: bitsandbytes' generic CPU 4-bit kernels"
    return "no AVX512: bitsandbytes' generic CPU kernels (slow; QLoRA on CPU is for testing)"


def known_problems(rows, flags: set[str]) -> list[str]:
    """Combinations that break or mislead, each with the fix."""
    out = []
    have = {name: v for name, v, _, _ in rows}

    def major_minor(v):
        return tuple(int(x) for x in v.split("+")[0].split(".")[:2]) if v else None

    if have["transformers"] and major_minor(have["transformers"]) >= (6, 0):
        out.append(
            f"transformers {have['transformers']}: dist_glm supports 5.x (GLM modeling and the Cache API "
            f"changed); `pip install -c {CONSTRAINTS_FILE.name} transformers`"
        )
    if have["deepspeed"] and major_minor(have["deepspeed"]) >= (0, 20):
        out.append(
            f"deepspeed {have['deepspeed']} is untested (universal checkpoints and ZeRO-3 gathering are used "
            f"directly); `pip install -c {CONSTRAINTS_FILE.name} deepspeed` or run `make test-latest` first"
        )
    if have["bitsandbytes"] is None:
        out.append("bitsandbytes is not installed: finetuning_type=qlora is refused; `pip install bitsandbytes`")
    return out


def extensions_dir() -> Path:
    """Where DeepSpeed builds its JIT ops: this environment's own folder unless the user chose one. The
    default ~/.cache/torch_extensions is shared by every environment (and often by every node through a
    shared home), so builds with different include paths fight over one lock file there."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def summary_line() -> str:
    rows = version_rows()
    parts = [f"{n} {v or 'missing'}" for n, v, _, _ in rows if n not in ("setuptools", "safetensors", "datasets")]
    untested = [f"{n} {v} (tested {w})" for n, v, w, ok in rows if not ok and w]
    verdict = "all as tested" if not untested else "UNTESTED: " + ", ".join(untested)
    flags = cpu_flags()
    cpu = "avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "no avx512"
    return f"environment: {', '.join(parts)}; {verdict}; {accelerator()}; cpu {cpu}"


def report() -> str:
    rows = version_rows()
    lines = [f"dist_glm environment (python {sys.version.split()[0]}, {sys.executable})", ""]
    lines.append(f"{'package':<14}{'installed':<18}{'tested (constraints.txt)':<26}")
    for name, have, want, ok in rows:
        mark = "ok" if ok else "untested" if have and want else "MISSING" if not have else "not pinned"
        lines.append(f"{name:<14}{have or '-':<18}{want or '-':<26}{mark}")
    flags = cpu_flags()
    lines += ["", f"accelerator: {accelerator()}", f"bitsandbytes CPU path: {bitsandbytes_cpu_path(flags)}"]
    lines.append(f"DeepSpeed op builds: {extensions_dir()}")
    problems = known_problems(rows, flags)
    lines += ["", "known problems:" if problems else "known problems: none"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_known_noise()
    print(summary_line() if "--brief" in argv else report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every framework trains on: the same saved initial weights, the same rows, the same settings.

A workload's model directory (config, tokenizer, model.safetensors) is written once under the cache
folder from a seed, so every framework starts from byte-identical weights. The rows are tokenized once
with our GLM-4 template (dist_glm.data) and handed to HF Trainer and TRL as input_ids/labels, so
only the trainer differs; LLaMA-Factory reads the raw rows with its own glm4 template.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_ROWS = REPO / "data" / "advertisegen_demo" / "train.jsonl"


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # the model directory's name under the cache folder (real_full and real_lora share one)
    lora: bool
    batch_size: int
    cutoff_len: int
    learning_rate: float
    steps: int
    rss_gib: float  # a generous peak per framework, to decide how many can run at once
    about: str
    # Each prompt (the attribute list) this many times over, the answer unchanged: SFT whose prompts
    # dominate (multi-turn history, retrieved context), where the LM head at every position costs most.
    prompt_repeat: int = 1
    # A multi-rank workload runs ours only, once per layout (label, extra train.py flags), each alone on the
    # machine in turn; `batch_size` is the global batch, split over `ranks`. Empty: the side-by-side kind.
    ranks: int = 1
    layouts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # "dpo": preference pairs (batch_size pairs a step; DPO, sigmoid loss at DPO_BETA), run by ours, TRL's
    # DPOTrainer and LLaMA-Factory's stage dpo; HF Trainer has no preference training.
    stage: str = "sft"


WORKLOADS = {
    w.name: w
    for w in (
        Workload("tiny", "tiny-glm4", False, 16, 128, 1e-3, 40, 1.0, "tiny demo GLM (0.9M params), full FT"),
        Workload("real_full", "glm4-real-vocab", False, 8, 128, 1e-4, 10, 4.0, "GLM head of real shape, full FT"),
        Workload("real_lora", "glm4-real-vocab", True, 8, 128, 1e-4, 10, 2.0, "same, LoRA r8 all-linear"),
        Workload(
            "real_long", "glm4-real-vocab", False, 8, 512, 1e-4, 6, 7.0, "real-shape head, full FT, prompts x8", 8
        ),
        Workload(
            "real_long2x", "glm4-real-vocab", False, 8, 512, 1e-4, 6, 10.0, "same with prompts twice as long (x16)", 16
        ),
        Workload(
            "mem128",
            "glm4-real-vocab",
            False,
            16,
            128,
            1e-4,
            3,
            8.0,
            "memory at 112-token rows (prompts x5) in cutoff 128, batch 16, full FT: against a plain HF loop",
            5,
        ),
        Workload(
            "moe_full",
            "glm4-moe-real-vocab",
            False,
            8,
            128,
            1e-4,
            10,
            4.0,
            "GLM-4.5-shaped MoE (glm4_moe, 16 experts top-4 + shared) at real vocabulary, full FT",
        ),
        Workload(
            "dpo_lora",
            "glm4-real-vocab",
            True,
            4,
            256,
            1e-5,
            8,
            4.0,
            "DPO (sigmoid) with LoRA r8 at real vocabulary: each demo answer against its wrong-colour twin",
            stage="dpo",
        ),
        Workload(
            "dpo_lora_long",
            "glm4-real-vocab",
            True,
            4,
            768,
            1e-5,
            6,
            8.0,
            "the same with prompts x8",
            8,
            stage="dpo",
        ),
        Workload(
            "moe_ep2",
            "glm4-moe-real-vocab",
            False,
            8,
            128,
            1e-4,
            10,
            8.0,
            "moe_full's model and rows on 2 ranks (4 rows each): ours with expert parallelism vs ZeRO-3",
            ranks=2,
            layouts=(
                ("ZeRO-2 + EP=2", ("--deepspeed=ds_configs/zero2.json", "--expert_parallel_size=2")),
                ("ZeRO-3", ("--deepspeed=ds_configs/zero3.json",)),
                ("ZeRO-2", ("--deepspeed=ds_configs/zero2.json",)),
            ),
        ),
    )
}
LORA_RANK, LORA_ALPHA, SEED = 8, 16.0, 42
DPO_BETA = 0.1  # TRL's and LLaMA-Factory's default

# Beyond what a workload fixes (model, rows, batch, cutoff, lr, steps, fp32, one process, no eval or saving):
# - "defaults": nothing more. Each framework runs as its users run it: its own optimizer implementation,
#   gradient checkpointing and dataloader defaults (the benchmark prints what those are for the versions
#   installed; LLaMA-Factory checkpoints activations unless told not to).
# - "matched": the same optimizer kernel for everyone (torch's fused AdamW, ours' and transformers' default)
#   and no gradient checkpointing anywhere.
PROFILES = ("defaults", "matched")
MATCHED_OPTIM = "adamw_torch_fused"


def peer_overrides(framework: str, profile: str) -> dict:
    """The settings a peer is given on top of the workload's, by profile (written into its settings file)."""
    if profile == "defaults":
        return {}
    if framework == "llamafactory":
        return {"optim": MATCHED_OPTIM, "disable_gradient_checkpointing": True}
    return {"optim": MATCHED_OPTIM, "gradient_checkpointing": False}


def build_model_dir(name: str, cache: Path) -> Path:
    """config + tokenizer + model.safetensors with random weights from SEED, written once (a marker
    file after the weights, so an interrupted build is redone)."""
    out = cache / "models" / name
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if name == "tiny-glm4":
        for f in (REPO / "assets" / "tiny-glm4").iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    else:
        # GLM-4's real vocabulary (151,552 rows, special tokens at their real ids) with a 2-layer,
        # hidden-512 body: the LM head and its cross-entropy dominate, as in glm-4-9b.
        # The MoE workload's body is GLM-4.5's shape (glm4_moe) instead.
        builder = REPO / "launch" / "build_demo_assets.py"
        flag = "--real-vocab-moe" if name == "glm4-moe-real-vocab" else "--real-vocab"
        subprocess.run([sys.executable, str(builder), flag, str(out)], check=True, capture_output=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).to(torch.float32)
    model.save_pretrained(out)
    (out / ".complete").write_text("")
    return out


def write_rows(w: Workload, out: Path) -> Path:
    """The workload's raw rows: the demo rows, each prompt repeated `prompt_repeat` times ("*"-joined, as
    AdvertiseGen joins attributes). The file every framework reads or is tokenized from. A DPO workload's
    rows are pairs in TRL's conversational shape (the prompt's user turn; each answer an assistant turn),
    the rejected answer the reference with another colour, as data/advertisegen_demo/pairs.jsonl."""
    colors = ("红色", "白色", "黑色", "蓝色", "粉色")
    with open(DEMO_ROWS, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            row = json.loads(line)
            row["content"] = "*".join([row["content"]] * w.prompt_repeat)
            if w.stage == "dpo":
                color = next((c for c in colors if c in row["summary"]), None)
                wrong = row["summary"].replace(color, colors[(colors.index(color) + 1 + i % 4) % 5], 1) if color else ""
                if not wrong:
                    continue
                row = {"prompt": [{"role": "user", "content": row["content"]}],
                       "chosen": [{"role": "assistant", "content": row["summary"]}],
                       "rejected": [{"role": "assistant", "content": wrong}]}  # fmt: skip
            g.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def tokenize_rows(model_dir: Path, rows: Path, cutoff_len: int, out: Path, stage: str = "sft") -> list[int]:
    """Our template's input_ids/labels for every row, as jsonl; returns each row's token count (a pair's:
    both answers' rows, as a step computes both). No row may be cut: the peers truncate differently, and
    a cut row would not be the same work."""
    from dist_glm.config import DataConfig
    from dist_glm.data.batching import build_examples
    from dist_glm.data.preference import load_pairs
    from dist_glm.models.loading import load_tokenizer

    tokenizer, data_cfg = load_tokenizer(str(model_dir)), DataConfig(cutoff_len=cutoff_len)
    if stage == "dpo":
        pairs, counts = load_pairs(str(rows), tokenizer, data_cfg, "glm4", [])
        assert not counts["truncated"], f"{counts['truncated']} answers longer than cutoff_len={cutoff_len}"
        examples = [e for p in pairs for e in (p.chosen, p.rejected)]
        with open(out, "w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")
        return [len(p.input_ids) for p in pairs]
    examples, stats = build_examples(str(rows), tokenizer, data_cfg, "glm4")
    assert not stats.truncated, f"{stats.truncated} rows longer than cutoff_len={cutoff_len}"
    with open(out, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")
    return [len(e.input_ids) for e in examples]


def write_llamafactory_data(rows: Path, folder: Path, stage: str = "sft") -> None:
    """The rows as an alpaca-style dataset with its dataset_info.json (content -> summary); DPO pairs as its
    sharegpt ranking dataset (the same messages, OpenAI-style tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_bytes(rows.read_bytes())
    entry = {"file_name": "train.jsonl", "columns": {"prompt": "content", "response": "summary"}}
    if stage == "dpo":
        tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
        columns = {"messages": "prompt", "chosen": "chosen", "rejected": "rejected"}
        entry = dict(file_name="train.jsonl", ranking=True, formatting="sharegpt", columns=columns, tags=tags)
        with open(rows, encoding="utf-8") as f, open(folder / "train.jsonl", "w", encoding="utf-8") as g:
            for line in f:  # LLaMA-Factory's ranking rows hold each answer as one message, not a list
                row = json.loads(line)
                row["chosen"], row["rejected"] = row["chosen"][0], row["rejected"][0]
                g.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"advertisegen_demo": entry}, indent=1))


def ours_command(w: Workload, model_dir: Path, rows: Path, run_dir: Path, layout: tuple[str, ...] = ()) -> list[str]:
    """Ours as a user runs it: python launch/train.py with flags (1 process, ZeRO-0, fp32); on several
    ranks, through the deepspeed launcher with the layout's flags and the global batch split over the ranks."""
    flags = dict(
        model_name_or_path=model_dir, dataset=rows, output_dir=run_dir, overwrite_output_dir="true",
        finetuning_type="lora" if w.lora else "full", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
        lora_target="all-linear", template="glm4", cutoff_len=w.cutoff_len,
        per_device_train_batch_size=w.batch_size // w.ranks,
        gradient_accumulation_steps=1, learning_rate=w.learning_rate, lr_scheduler_type="constant", warmup_ratio=0,
        weight_decay=0, max_grad_norm=1.0, max_steps=w.steps, logging_steps=1, save_steps=0, seed=SEED,
        disable_tqdm="true", **({"stage": "dpo", "pref_beta": DPO_BETA} if w.stage == "dpo" else {}),
    )  # fmt: skip
    train = [str(REPO / "launch" / "train.py")] + [f"--{k}={v}" for k, v in flags.items()] + list(layout)
    if w.ranks == 1:
        return [sys.executable, *train]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(w.ranks), "--master_port", str(free_port()), *train]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_settings(
    w: Workload, framework: str, model_dir: Path, rows: Path, run_dir: Path, profile: str = "defaults"
) -> dict:
    """The settings file peer_train.py reads (HF Trainer and TRL); `trainer_args` go to the trainer's
    arguments as they are, nothing else is set there beyond the workload."""
    return dict(
        framework=framework, model=str(model_dir), data=str(rows), output_dir=str(run_dir), lora=w.lora,
        lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, batch_size=w.batch_size, cutoff_len=w.cutoff_len,
        learning_rate=w.learning_rate, steps=w.steps, seed=SEED, trainer_args=peer_overrides(framework, profile),
        stage=w.stage, beta=DPO_BETA,
    )  # fmt: skip


def llamafactory_config(w: Workload, model_dir: Path, data_dir: Path, run_dir: Path, profile: str = "defaults") -> dict:
    """LLaMA-Factory's own recipe for the same run (`llamafactory-cli train CONFIG.yaml`)."""
    cfg = dict(
        model_name_or_path=str(model_dir), stage=w.stage, do_train=True, finetuning_type="lora" if w.lora else "full",
        dataset="advertisegen_demo", dataset_dir=str(data_dir), template="glm4", cutoff_len=w.cutoff_len,
        overwrite_cache=True, preprocessing_num_workers=1, output_dir=str(run_dir), overwrite_output_dir=True,
        logging_steps=1, save_strategy="no", plot_loss=False, report_to="none",
        per_device_train_batch_size=w.batch_size, gradient_accumulation_steps=1, learning_rate=w.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=w.steps,
        seed=SEED, disable_tqdm=True, bf16=False, fp16=False, **peer_overrides("llamafactory", profile),
    )  # fmt: skip
    if w.lora:
        cfg.update(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_target="all", lora_dropout=0.0)
    if w.stage == "dpo":
        cfg.update(pref_beta=DPO_BETA, pref_loss="sigmoid")
    return cfg

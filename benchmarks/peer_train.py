"""The peers' training script: plain HF Trainer or TRL's SFTTrainer on the benchmark's pre-tokenized rows, or
TRL's DPOTrainer on the raw pairs of a DPO workload, or a plain loop without a trainer (`hf_loop`).

It runs inside a peer's own venv (python peer_train.py SETTINGS.json), so it imports nothing from
dist_glm: only torch, transformers, peft and (for TRL) trl and datasets. Both trainers get the same
input_ids/labels our template produced, so only the trainer differs from ours. Each logged step is
appended to steps.jsonl at once (flushed), which the benchmark watches from outside, as it watches
our metrics.jsonl and LLaMA-Factory's trainer_log.jsonl.
"""

import json
import sys
from pathlib import Path

# fp32 is the workload's: TRL's SFTConfig would otherwise turn bf16 on by itself (bf16 = not fp16), on CPU too.
PRECISION = {"bf16": False, "fp16": False}


def load_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def lora_model(model, s: dict):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, cfg)


def plain_loop(model, tokenizer, rows: list[dict], s: dict, steps_log) -> None:
    """What a user writes without a trainer: shuffled batches padded to their longest row, the model's own
    loss (HF's, on the full B x T x V logits), backward, clipping at 1.0, torch.optim.AdamW as written (the
    matched profile: fused), no scheduler (the workload's rate is constant)."""
    import torch

    args = s.get("trainer_args", {})
    if args.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    fused = True if args.get("optim") == "adamw_torch_fused" else None
    opt = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], weight_decay=0.0, fused=fused)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(s["seed"])).tolist()
    model.train()
    for step in range(1, s["steps"] + 1):
        batch = [rows[order[(step - 1) * s["batch_size"] + i] % len(rows)] for i in range(s["batch_size"])]
        width = max(len(r["input_ids"]) for r in batch)
        padded = {
            key: torch.tensor([r[src] + [value] * (width - len(r[src])) for r in batch])
            for key, src, value in (("input_ids", "input_ids", tokenizer.pad_token_id), ("labels", "labels", -100))
        }
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        loss = model(**padded, attention_mask=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps_log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        steps_log.flush()


def main(settings_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    s = json.loads(Path(settings_path).read_text())
    steps_log = open(Path(s["output_dir"]) / "steps.jsonl", "a", encoding="utf-8")

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps_log.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")
                steps_log.flush()

    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    if s["lora"]:
        model = lora_model(model, s)
    common = dict(
        output_dir=s["output_dir"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=s["steps"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=s["seed"],
        use_cpu=not torch.cuda.is_available(),
        **PRECISION,
        **s.get("trainer_args", {}),  # the benchmark's profile: nothing (the trainer's defaults) or matched settings
    )
    rows = load_rows(s["data"])
    if s["framework"] == "hf_loop":
        return plain_loop(model, tokenizer, rows, s, steps_log)
    if s.get("stage") == "dpo":  # TRL's DPOTrainer on the raw pairs (conversational: its chat template renders them)
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        args = DPOConfig(**common, max_length=s["cutoff_len"], beta=s["beta"], loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    elif s["framework"] == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # Pre-tokenized rows with labels: TRL keeps a dataset's own labels column as it is.
        data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        args = SFTConfig(**common, max_length=s["cutoff_len"], packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        data = [{"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": [1] * len(r["input_ids"])}
                for r in rows]  # fmt: skip
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        args = TrainingArguments(**common, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.add_callback(StepLog())
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])

"""Sequence-level distillation: the teacher answers the recipe's prompts, and its answers become an
ordinary dataset the student trains on with plain cross-entropy.

`launch/distill_generate.py RECIPE --teacher_model_name_or_path=DIR --output_file=teacher.jsonl` reads
the recipe's `dataset` as training would (formats, template, cutoff_len), gives the teacher each
conversation up to its last assistant turn, generates greedily up to `generation_max_new_tokens` tokens
(stopping at any of GLM's end-of-reply ids), and writes the conversation with the teacher's reply in
place of the last one, in OpenAI `messages` form (tools and tool calls kept), plus a `distilled` record
of where it came from. Rows are appended a chunk at a time and flushed to disk: a rerun of the same
command continues after the last complete row. Ranks share the prompts of each chunk.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dist_glm.config import option
from dist_glm.errors import UserError
from dist_glm.runtime import collectives, environment

CHUNK_PER_RANK = 64  # prompts per rank between two writes: the most an interruption can lose


@dataclass
class GenerateArgs:
    output_file: str = option("", "The dataset to write (jsonl); rerunning continues it after its last complete row.")
    max_rows: int = option(0, "Answer only the first N conversations (0 = all).")


def to_openai(conv: dict) -> dict:
    """A conversation (dist_glm.data.converters) as an OpenAI `messages` row, which reads back to it."""
    messages = [{"role": "system", "content": conv["system"]}] if conv.get("system") else []
    for m in conv["messages"]:
        reasoning = {"reasoning_content": m["reasoning"]} if m.get("reasoning") is not None else {}
        if m.get("tool_call"):
            call = {"type": "function", "function": m["tool_call"]}
            if m.get("same_turn") and messages and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # one turn that calls several tools
            else:
                messages.append(
                    {"role": "assistant", "content": m.get("content", ""), **reasoning, "tool_calls": [call]}
                )
        elif m["role"] == "observation":
            messages.append({"role": "tool", "content": m["content"]})
        else:
            messages.append({"role": m["role"], "content": m["content"], **reasoning})
    row = {"messages": messages}
    if conv.get("tools"):
        row["tools"] = conv["tools"]
    return row


def teacher_reply(text: str) -> dict:
    """The teacher's generated reply as an assistant message: a thinking teacher's thought (GLM-4.5 onward;
    glm4_7's prompt already opened it with <think>) goes to `reasoning`, written out as reasoning_content."""
    from dist_glm.data.thinking import split_reasoning

    if "</think>" in text and "<think>" not in text:
        text = "<think>" + text  # the prompt's own <think> (glm4_7)
    if "</think>" not in text:
        return {"role": "assistant", "content": text}
    reasoning, answer = split_reasoning({"content": text})
    return {"role": "assistant", "content": answer.strip(), "reasoning": reasoning.strip()}


def _complete_rows(path: Path) -> int:
    """Rows already written whole; a torn last line (an interrupted write) is cut off."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


def generate_dataset(cfg, args: GenerateArgs) -> Path:
    """Collective (every rank holds the whole teacher and takes a share of each chunk)."""
    from dist_glm.data.batching import Example
    from dist_glm.data.converters import load_conversations
    from dist_glm.data.loading import recipe_template
    from dist_glm.data.template import build_template
    from dist_glm.models.loading import generation_eos_ids, load_tokenizer
    from dist_glm.objectives.teacher import check_teacher, load_teacher
    from dist_glm.training.evaluation import predict

    d = cfg.distill
    problems = (
        [] if d.teacher_model_name_or_path else ["teacher_model_name_or_path is required: the teacher that answers"]
    )
    problems += [] if args.output_file else ["output_file is required: the jsonl dataset to write"]
    teacher_problems, teacher_art = check_teacher(cfg, need_teacher=True)
    problems += teacher_problems
    if problems:
        raise UserError(problems)
    out = Path(args.output_file)
    _, world = environment.init_distributed(str(out.parent.resolve()), cfg.train.preflight_timeout)
    device = environment.local_device()
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    name = recipe_template(cfg, tokenizer)
    template = build_template(name, tokenizer, cfg.data.mask_history, cfg.data.train_on_prompt)
    skipped: list[dict] = []
    conversations = [c for c in load_conversations(cfg.data.dataset, cfg.data, skipped) if "text" not in c]
    conversations = conversations[: args.max_rows] if args.max_rows else conversations
    prompts, rows = [], []
    for conv in conversations:
        last = max((i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"), default=None)
        if last is None:
            continue  # nothing to answer
        prompt_conv = {**conv, "messages": conv["messages"][:last] + [{"role": "assistant", "content": ""}]}
        enc = template.encode(prompt_conv, cfg.data.cutoff_len)
        prompts.append(Example(enc.input_ids, enc.labels, enc.prompt_ids, conv["messages"][last]["content"]))
        rows.append((conv, last))
    teacher = load_teacher(cfg, teacher_art, device=device, ds_config={}).module
    eos = generation_eos_ids(d.teacher_model_name_or_path, tokenizer)
    done = collectives.broadcast_object(_complete_rows(out) if collectives.is_main_process() else None)
    collectives.log(f"{len(prompts)} prompts; {done} already answered in {out}" if done else f"{len(prompts)} prompts")
    step = CHUNK_PER_RANK * max(world, 1)
    for start in range(done, len(prompts), step):
        chunk = prompts[start : start + step]
        replies, _ = predict(
            teacher,
            chunk,
            tokenizer,
            cfg.train.per_device_eval_batch_size,
            cfg.train.generation_max_new_tokens,
            eos,
            False,
            device,
        )
        if collectives.is_main_process():
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a", encoding="utf-8") as f:
                for (conv, last), reply in zip(rows[start : start + step], replies, strict=True):
                    answered = {**conv, "messages": conv["messages"][:last] + [teacher_reply(reply)]}
                    row = to_openai(answered)
                    row["distilled"] = {
                        "teacher": d.teacher_model_name_or_path,
                        "teacher_adapter": d.teacher_adapter_name_or_path,
                        "source": conv.get("where", ""),
                        "max_new_tokens": cfg.train.generation_max_new_tokens,
                    }
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        collectives.log(f"answered {min(start + step, len(prompts))} of {len(prompts)} prompts")
    collectives.barrier()
    collectives.log(f"teacher answers in {out}: train the student on it as any dataset (dataset={out})")
    return out

"""The memory planner: per-rank bytes of a training recipe under each ZeRO stage and offload choice, and
the cheapest setting that fits (launch/plan.py, docs/planning.md).

    python launch/plan.py configs/glm4_9b_full.yaml --num_gpus=8 --gpu_memory_gb=80

Counts come from the model built on the meta device with the recipe's method applied, and the
activations from a traced forward pass (dist_glm.planning.trace). The rest is DeepSpeed 0.19's own
accounting, per rank, for Ψ parameters of which Ψt train, on N ranks, b bytes per element of the
training dtype (2 for bf16/fp16, 4 for fp32):

- parameters: Ψ·b (ZeRO 0-2); ZeRO-3 partitions them (Ψ·b/N) but keeps parameters under its
  persistence threshold (1e5 elements) whole on every rank and gathers one module at a time plus its
  prefetch bucket (5e7 elements) while it computes; with offload_param the partitions live on the host.
  QLoRA's frozen linear weights take 4 or 8 bits plus their quantization constants.
- gradients: Ψt·b (ZeRO 0-1), Ψt·b/N (ZeRO 2-3), none on the GPU when the optimizer is offloaded;
  at ZeRO 2-3 autograd still makes each module's gradient whole before DeepSpeed copies it into a
  bucket, so the largest trained module's gradient (GLM's embedding or head) is alive in backward.
- optimizer: fp32 master weights, Adam's two moments: 12·Ψt (ZeRO-0), 12·Ψt/N (ZeRO 1-3) [8·Ψt at
  ZeRO-0 in fp32, where the weights are their own master copy]; on the host when offloaded. The step
  adds the fp32 copy of the gradients DeepSpeed makes and Adam's denominator sqrt(v) + eps, 4 bytes a
  parameter each (8·Ψt at ZeRO-0, 8·Ψt/N above; in fp32 at ZeRO-0 only the denominator).
- buffers: DeepSpeed's gradient buckets of reduce_bucket_size (5e8 elements, b bytes each): one at
  ZeRO-1 and ZeRO-3, two at ZeRO-2 (overlap_comm double-buffers them).
- activations: what the forward pass keeps for backward at per_device_train_batch_size x cutoff_len
  tokens; with gradient checkpointing each layer's input plus one layer recomputed in backward. The
  backward pass holds gradients of one layer's activations on top (BACKWARD_TRANSIENT).
- head: the LM head runs on the labelled positions in chunks of cross_entropy.CHUNK_ELEMENTS logits
  (dist_glm.objectives.cross_entropy): the gathered hidden states (every token labelled, the worst case)
  plus one chunk's logits, their fp32 copy, log-softmax and gradients at the chunk's backward.

The step's temporaries exist only after backward has freed the activations, and the head's chunk
runs before any layer's backward, so a rank's peak takes the larger of each pair (Row.total).
Validated against real training processes in docs/planning.md.
"""

from dataclasses import dataclass

from dist_glm.config import option
from dist_glm.planning.trace import Trace

GIB = 2**30
BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce_bucket_size default (our ds configs leave it "auto")
PREFETCH_ELEMENTS = 50_000_000  # stage3_prefetch_bucket_size default
# (stage, optimizer offloaded, parameters offloaded, the shipped ds config), cheapest first.
SETTINGS = (
    (0, False, False, "ds_configs/zero0.json"),
    (1, False, False, "ds_configs/zero1.json"),
    (2, False, False, "ds_configs/zero2.json"),
    (3, False, False, "ds_configs/zero3.json"),
    (2, True, False, "ds_configs/zero2_offload.json"),
    (3, True, True, "ds_configs/zero3_offload.json"),
)
# The backward pass of a layer holds gradients of its activations worth about a third of what the layer
# saved, on top of the saved (PyTorch's profiler on the tiny GLM at 16 x 512 tokens: 18 MiB over 54).
BACKWARD_TRANSIENT = 0.35


@dataclass
class PlanArgs:
    num_gpus: int = option(8, "GPUs (ranks) the run would use.")
    gpu_memory_gb: float = option(80.0, "Memory of one GPU in GiB (80 for an A100/H100 80GB).")
    gpus_per_node: int = option(0, "GPUs per node, for the host RAM of one node (0 = min(num_gpus, 8)).")
    headroom: float = option(
        0.1,
        "Share of each GPU's memory kept free for what the per-rank bytes leave out: the CUDA context, "
        "NCCL's buffers, the allocator's fragmentation.",
    )
    model: str = option(
        "",
        "Plan for a shipped config.json (assets/model_configs, e.g. glm-4-9b-chat-hf) instead of model_name_or_path.",
    )


@dataclass
class Activations:
    """Per-rank activation bytes for one micro-batch, from the trace."""

    saved: int  # kept for backward when the forward pass ends, gradient checkpointing off
    saved_gc: int  # the same with it on: each layer's input only
    layer: int  # the largest layer's saved bytes: what checkpointing recomputes at once in backward
    transient: int  # gradients of one layer's activations while its backward runs
    head_saved: int  # the hidden states gathered at labelled positions
    head_chunk: int  # one logits chunk at its peak, in backward

    def peak(self, gc: bool) -> int:
        # The head's chunk runs before any layer's backward starts, so the two never add up.
        extra = self.layer + self.transient if gc else self.transient
        return (self.saved_gc if gc else self.saved) + self.head_saved + max(self.head_chunk, extra)


def dtype_bytes(cfg) -> int:
    return 2 if (cfg.train.bf16 or cfg.train.fp16) else 4


def activations_of(tr: Trace, cfg) -> Activations:
    from dist_glm.objectives.cross_entropy import CHUNK_ELEMENTS

    b = dtype_bytes(cfg)
    tokens = cfg.train.per_device_train_batch_size * cfg.data.cutoff_len  # every token labelled: the worst case
    layer = max(tr.layer_saved_bytes, default=0)
    kept = sum(tr.layer_input_bytes for saved in tr.layer_saved_bytes if saved)  # layers backward reaches
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // tr.vocab_size))
    return Activations(
        saved=tr.outside_saved_bytes + sum(tr.layer_saved_bytes),
        saved_gc=tr.outside_saved_bytes + kept,
        layer=layer,
        transient=int(BACKWARD_TRANSIENT * layer),
        head_saved=tokens * tr.hidden_size * b,
        # logits in the dtype, their gradient twice over (fp32 and back), log-softmax: measured 12 bytes an
        # element in bf16 and 18 in fp32 at GLM-4's vocabulary
        head_chunk=chunk * tr.vocab_size * (3 * b + 6),
    )


def quantized_bytes_per_param(cfg) -> float:
    """bitsandbytes storage: 8-bit = a byte (plus a per-row scale); 4-bit = half a byte plus an fp32 absmax
    per 64 weights, or with double quantization an 8-bit one per 64 and an fp32 one per 256 blocks."""
    m = cfg.method
    if m.quantization_bit == 8:
        return 1.0
    return 0.5 + ((1 + 4 / 256) / 64 if m.double_quantization else 4 / 64)


def param_bytes(tr: Trace, cfg) -> float:
    q = tr.quantized_params
    return (tr.total_params - q) * dtype_bytes(cfg) + q * quantized_bytes_per_param(cfg)


@dataclass
class Row:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    ds_config: str
    params: int
    grads: int
    optimizer: int  # fp32 master weights and moments on the GPU
    step_grads: int  # the step's fp32 copy of the gradients and Adam's denominator, on the GPU
    whole_grad: int  # one module's whole gradient in backward, before ZeRO 2-3 partition it
    buffers: int
    act: Activations
    host_per_rank: int  # what offload keeps in host RAM, per rank
    expert_parallel: int = 1  # ranks each routed expert is spread over (DeepSpeed AutoEP); 1 = none

    @property
    def name(self) -> str:
        name = self.ds_config.rsplit("/", 1)[-1].removesuffix(".json")
        return name + (f" + EP={self.expert_parallel}" if self.expert_parallel > 1 else "")

    @property
    def flags(self) -> str:
        ep = f" --expert_parallel_size={self.expert_parallel}" if self.expert_parallel > 1 else ""
        return f"--deepspeed={self.ds_config}{ep}"

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers

    def total(self, gc: bool) -> int:
        # The step's temporaries are made after backward has freed the activations.
        return self.states + max(self.act.peak(gc) + self.whole_grad, self.step_grads)


def plan_rows(tr: Trace, cfg, num_gpus: int) -> list[Row]:
    """One Row per shipped (stage, offload) setting."""
    b, n, psi_t = dtype_bytes(cfg), num_gpus, tr.trainable_params
    weights = param_bytes(tr, cfg)
    act = activations_of(tr, cfg)
    rows = []
    for stage, off_opt, off_param, ds_config in SETTINGS:
        params, host = weights, 0.0
        if stage == 0:
            # DeepSpeed's ZeRO-0 bf16/fp16 optimizer keeps fp32 master weights and flattens fp32 gradients
            # for the step; in fp32 the weights and gradients are their own.
            grads, buffers, whole_grad = psi_t * b, 0, 0
            opt, step = (8 + (4 if b == 2 else 0)) * psi_t, (8 if b == 2 else 4) * psi_t
        else:
            grads = psi_t * b if stage == 1 else psi_t * b / n
            opt, step = 12 * psi_t / n, 8 * psi_t / n
            whole_grad = tr.largest_trainable_params * b if stage >= 2 else 0
            # Allocated whole whatever the model's size (torch.empty of reduce_bucket_size elements).
            buffers = BUCKET_ELEMENTS * b * (2 if stage == 2 else 1)  # zero2.json double-buffers (overlap_comm)
            if stage == 3:
                whole = tr.small_params * b  # under the persistence threshold: on every rank in full
                working = min((tr.largest_module_params + PREFETCH_ELEMENTS) * b, weights)
                partition = (weights - whole) / n
                params = whole + working + (0 if off_param else partition)
                host += partition if off_param else 0
        if off_opt:  # fp32 master weights, moments and gradient partitions live on the host
            host += 16 * psi_t / n
            grads, opt, step = 0, 0, 0
        rows.append(
            Row(
                stage=stage,
                offload_optimizer=off_opt,
                offload_param=off_param,
                ds_config=ds_config,
                params=int(params),
                grads=int(grads),
                optimizer=int(opt),
                step_grads=int(step),
                whole_grad=int(whole_grad),
                buffers=int(buffers),
                act=act,
                host_per_rank=int(host),
            )
        )
    ep = expert_parallel_size(tr, cfg, n)
    if ep > 1:
        rows.insert(
            3, expert_parallel_row(tr, cfg, n, ep, next(r for r in rows if r.stage == 2 and not r.offload_optimizer))
        )
    return rows


def expert_parallel_size(tr: Trace, cfg, num_gpus: int) -> int:
    """The expert parallelism worth planning: the largest N dividing both the GPUs and the experts, for
    the methods that take it (full, freeze; adapters are refused with it)."""
    from dist_glm.methods import get_method

    if not tr.experts or get_method(cfg.method.finetuning_type).is_adapter:
        return 1
    return max(n for n in range(1, num_gpus + 1) if num_gpus % n == 0 and tr.experts % n == 0)


def expert_parallel_row(tr: Trace, cfg, n: int, ep: int, zero2: Row) -> Row:
    """ZeRO-2 with the routed experts spread over `ep` ranks (DeepSpeed AutoEP): a rank holds 1/ep of the
    experts' weights; gradients and optimizer states are partitioned as at ZeRO-2 (the experts' over the
    n/ep ranks that hold the same experts, which is again 1/n of them per rank)."""
    import dataclasses

    kept = tr.expert_params * dtype_bytes(cfg) * (1 - 1 / ep)
    return dataclasses.replace(zero2, params=int(zero2.params - kept), expert_parallel=ep)


def host_bytes(tr: Trace, cfg, row: Row, num_gpus: int, ranks_per_node: int) -> tuple[int, int]:
    """Host RAM of one node (the one with rank 0) while the weights load and while results are saved.

    Load: below ZeRO-3 every rank reads the whole model into CPU memory before the engine moves it to
    its GPU, all ranks at once; ZeRO-3 loads partitions. Save, the larger of two moments: a checkpoint,
    where torch.save copies each rank's tensors to the host one at a time (DeepSpeed's flat fp32
    partitions are the largest), and the final export, where rank 0 gathers what the method exports on
    the CPU in the training dtype (distributed.gather_state_dict: the whole model for full and freeze,
    the adapter or prefix otherwise) for save_pretrained. Offloaded states stay on the host throughout."""
    from dist_glm.methods import get_method

    offloaded = row.host_per_rank * ranks_per_node
    load = offloaded + (0 if row.stage == 3 else param_bytes(tr, cfg) * ranks_per_node)
    method = get_method(cfg.method.finetuning_type)
    exported = tr.trainable_params if method.export_trainable_only else tr.total_params
    if row.offload_optimizer:
        copies = 0  # already on the host
    elif row.stage == 0:
        copies = 4 * tr.trainable_params  # rank 0 alone writes the optimizer state
    else:
        copies = ranks_per_node * 4 * tr.trainable_params / num_gpus  # every rank writes its partition
    return int(load), int(offloaded + max(copies, exported * dtype_bytes(cfg)))


def recommend(rows: list[Row], gpu_bytes: float) -> tuple[Row, bool] | None:
    """The cheapest (row, gradient checkpointing) that fits. Cheapest = fastest: no offload before
    offload (its step runs on the CPU), then no gradient checkpointing before it (a third more
    compute on every step), then the lowest ZeRO stage (ZeRO-3's extra all-gathers overlap with compute
    on a fast interconnect; recomputation never does)."""
    for offload in (False, True):
        for gc in (False, True):
            for row in rows:
                if row.offload_optimizer == offload and row.total(gc) <= gpu_bytes:
                    return row, gc
    return None


def _formatter(largest: float):
    """GiB for real models, MiB when every number is small (the tiny test models)."""
    unit, size = ("MiB", 2**20) if largest < GIB else ("GiB", GIB)
    return unit, lambda n: f"{n / size:.1f}" if n < 100 * size else f"{n / size:.0f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def render(tr: Trace, cfg, args: PlanArgs, recipe: str) -> str:
    """The planner's report: one row per (stage, offload), host RAM, the recommendation."""
    n = args.num_gpus
    per_node = args.gpus_per_node or min(n, 8)
    gpu_bytes = args.gpu_memory_gb * GIB * (1 - args.headroom)
    rows = plan_rows(tr, cfg, n)
    unit, gib = _formatter(max(r.total(False) for r in rows))
    t = cfg.train
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    current = cfg.train.deepspeed.rsplit("/", 1)[-1].removesuffix(".json") or "zero0"
    moe = (
        f" ({_count(tr.active_params)} active per token: {tr.experts} routed experts, top-{tr.top_k}; the routed "
        f"experts are {100 * tr.expert_params / tr.total_params:.0f}% of the weights)"
        if tr.experts
        else ""
    )
    lines = [
        f"{recipe}: {_count(tr.total_params)} parameters{moe}, {tr.trainable_params:,} trainable "
        f"({cfg.method.finetuning_type}), {precision}, micro-batch {t.per_device_train_batch_size} x "
        f"{cfg.data.cutoff_len} tokens, {n} GPUs x {args.gpu_memory_gb:g} GiB"
        + ("" if args.gpus_per_node else f" ({per_node} per node: gpus_per_node=0 means min(num_gpus, 8))"),
        "",
        f"{unit} per rank | params | grads | optimizer (+step) | buffers | activations GC off / on | head "
        "| total GC off | total GC on | fits | host RAM per node: load / save",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for row in rows:
        off, on = row.total(False), row.total(True)
        fits = "yes" if off <= gpu_bytes else "with GC" if on <= gpu_bytes else "no"
        load, save = host_bytes(tr, cfg, row, n, per_node)
        a = row.act
        mark = " (recipe)" if row.name == current else ""
        opt = f"{gib(row.optimizer)} (+{gib(row.step_grads)})"
        lines.append(
            f"| {row.name}{mark} | {gib(row.params)} | {gib(row.grads)} | {opt} "
            f"| {gib(row.buffers)} | {gib(a.saved + a.transient)} / {gib(a.saved_gc + a.layer + a.transient)} "
            f"| {gib(a.head_saved + a.head_chunk)} | {gib(off)} | {gib(on)} | {fits} | {gib(load)} / {gib(save)} |"
        )
    lines += [
        "",
        f"A total is what a rank holds at its peak, not the sum of the columns; it fits when it is at most "
        f"{gib(gpu_bytes)} {unit} ({100 * (1 - args.headroom):g}% of the GPU). Host RAM: the node of {per_node} "
        "ranks with rank 0. See docs/planning.md.",
    ]
    choice = recommend(rows, gpu_bytes)
    if choice is None:
        smallest = min(rows, key=lambda r: r.total(True))
        lines.append(
            f"Nothing fits in {gib(gpu_bytes)} {unit}: the smallest is {smallest.name} with gradient "
            f"checkpointing at {gib(smallest.total(True))} {unit} per rank; lower per_device_train_batch_size or "
            "cutoff_len, add GPUs, or train lora/qlora."
        )
    else:
        row, gc = choice
        load, _ = host_bytes(tr, cfg, row, n, per_node)
        kept = args.gpu_memory_gb * GIB - row.total(gc)
        lines.append(
            f"Recommended: {row.flags} --gradient_checkpointing={str(gc).lower()} "
            f"({gib(row.total(gc))} {unit} per GPU of {args.gpu_memory_gb:g} GiB; the {gib(kept)} {unit} left are "
            f"for the CUDA context, NCCL's buffers and allocator fragmentation; the node needs {gib(load)} {unit} "
            "of host RAM while the model loads). These GPU figures are computed and validated against training "
            "peaks on CPU only; no GPU measurement has checked them yet."
        )
    return "\n".join(lines)


def plan_command():
    import dataclasses

    from dist_glm import config

    return dataclasses.replace(
        config.TRAIN,
        prog="plan.py",
        usage="plan.py RECIPE.yaml [--num_gpus=8] [--gpu_memory_gb=80] [--key=value ...]",
        description="Per-rank memory of a training recipe under each ZeRO stage and offload choice "
        "(docs/planning.md); reads only the model's config.json.",
        sections={**config.TRAIN.sections, "plan": (PlanArgs, None)},
        default_yaml=None,
    )


def check(cfg, args: PlanArgs) -> list[str]:
    """The recipe's value checks, less those about files planning does not read, and the plan's own."""
    from dist_glm import config

    unread = ("dataset is required", "output_dir is required")
    problems = [p for p in config.check_values(cfg) if not p.startswith(unread)]
    if args.num_gpus < 1:
        problems.append(f"num_gpus={args.num_gpus} must be at least 1")
    if not 0 < args.gpu_memory_gb < 1e6:  # inf and nan included
        problems.append(f"gpu_memory_gb={args.gpu_memory_gb} must be a GPU's memory in GiB, e.g. 80")
    if not 0 <= args.headroom < 1:
        problems.append(f"headroom={args.headroom} must be in [0, 1), e.g. 0.1")
    if args.gpus_per_node < 0:
        problems.append(f"gpus_per_node={args.gpus_per_node} must be 0 (= min(num_gpus, 8)) or more")
    return problems

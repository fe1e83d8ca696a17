"""The training loop: one loop for every method, ZeRO stage and launcher.

The DeepSpeed engine owns backward, accumulation, clipping and the optimizer step; methods differ
only in how the model is prepared and what gets saved (dist_glm.methods).
"""

import itertools
import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_glm.checkpointing import checkpoints
from dist_glm.checkpointing.trainer_state import TrainerState
from dist_glm.config import SECTIONS, Config, save_config
from dist_glm.data.batching import GlobalBatchSampler, pad_share, sample_lengths
from dist_glm.data.loading import load_datasets
from dist_glm.data.prefetch import Prefetcher, pin_on
from dist_glm.errors import UserError
from dist_glm.methods import Method, count_parameters
from dist_glm.models import moe
from dist_glm.models.loading import (
    add_neftune,
    apply_liger,
    describe_layout,
    enable_gradient_checkpointing,
    generation_eos_ids,
    load_model,
    load_tokenizer,
)
from dist_glm.objectives import Objective, build_objective
from dist_glm.runtime import collectives, deepspeed_config, environment
from dist_glm.runtime.collectives import log
from dist_glm.runtime.doctor import slow_bf16_warning, summary_line
from dist_glm.runtime.preemption import PREEMPTED_EXIT, Preempted, PreemptionWatch, mark_for_requeue
from dist_glm.runtime.staging import as_umask_allows
from dist_glm.training import continued
from dist_glm.training.checks import Inputs, validate_inputs
from dist_glm.training.evaluation import eval_loss, predict
from dist_glm.training.guard import StepGuard
from dist_glm.training.optimizer import build_optimizer, build_scheduler, expert_parallel_optimizer
from dist_glm.training.step import StepResult, loss_scale, takes_over_clipping, train_step
from dist_glm.training.telemetry import (
    MetricsLogger,
    Progress,
    ThroughputWindow,
    json_safe,
    memory_gb,
    run_settings,
    train_flops_per_token,
)
from dist_glm.training.trackers import check_installed


class FinalEvalFailed(Exception):
    """The run trained and its final model is saved, but the evaluation after it failed."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        super().__init__(f"the final evaluation failed; the trained model is saved in {output_dir}")


@dataclass
class Run:
    """Everything set up for training; built once by `setup`, read by the loop."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    train_examples: list
    eval_sets: dict[str, list]  # name -> examples; one set named "" unless eval_dataset names them
    sampler: GlobalBatchSampler
    total_steps: int
    ds_config: dict
    method: Method
    engine: object
    eos_ids: list[int]
    num_params: int
    objective: Objective  # what the loss is (dist_glm.objectives)
    routing: moe.RoutingStats  # tokens per expert (empty for a dense model)
    resume_path: Path | None
    resume_tag: str


def setup(cfg: Config, inputs: Inputs) -> Run:
    """Form the process group, tokenize, load and prepare the model, build the engine."""
    import deepspeed

    t = cfg.train
    rank, world = environment.init_distributed(t.output_dir, t.preflight_timeout, t.ddp_timeout)
    device = environment.local_device()
    log(summary_line())
    if t.bf16 and (slow := slow_bf16_warning()):
        log(slow)
    # The settings that differ from the defaults; every one is in output_dir/config.yaml and TensorBoard.
    defaults = Config(**{name: section() for name, section in SECTIONS.items()}).to_flat_dict()
    changed = {k: v for k, v in cfg.to_flat_dict().items() if v != defaults.get(k)}
    log(f"world_size={world}; settings other than the defaults: {json.dumps(changed, ensure_ascii=False)}")

    continued.prepare_merged_base(cfg)  # merge_adapter: from here on the merge is the model
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    if layout := describe_layout(cfg.model.model_name_or_path):
        log(layout)
    data = load_datasets(cfg, tokenizer, inputs.method.can_pack)
    train_examples, eval_sets = data.train, data.eval_sets
    mbs, gas = t.per_device_train_batch_size, t.gradient_accumulation_steps
    unpacked_pad = pad_share(data.samples, GlobalBatchSampler(len(data.samples), mbs, gas, world, t.seed))
    lengths = sample_lengths(train_examples) if cfg.data.group_by_length else None
    sampler = GlobalBatchSampler(len(train_examples), mbs, gas, world, t.seed, lengths)
    used = " with packing" * data.packed + " with group_by_length" * cfg.data.group_by_length
    used_pad = f", {100 * pad_share(train_examples, sampler):.1f}%{used}" if used else ""
    log(f"padding per epoch: {100 * unpacked_pad:.1f}% of tokens are pad without packing{used_pad}")
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"dataset has {len(train_examples)} samples, fewer than one global batch of "
            f"{sampler.global_batch} (per_device_train_batch_size x gradient_accumulation_steps x "
            f"{world} ranks); lower per_device_train_batch_size or gradient_accumulation_steps"
        )
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * sampler.steps_per_epoch)

    ds_config, resume_path = inputs.ds_config, inputs.resume_path
    resume_tag = checkpoints.choose_resume_tag(resume_path, cfg, world, ds_config) if resume_path else checkpoints.TAG
    method = inputs.method
    model = load_model(cfg.model, ds_config, t.dtype, t.seed, method.quantization_config(cfg))
    if cfg.model.use_liger_kernel:  # before the method wraps modules, so adapters sit on the patched MLP
        apply_liger(model)
    torch.manual_seed(t.seed)  # adapter init is identical on every rank and in every run
    model = continued.prepare_trainable(model, method, cfg)
    # from_pretrained returns a model in eval mode: without this, LoRA dropout, NEFTune and the routing
    # metrics (all active in training mode only) were silently off for every pretrained base.
    model.train()
    if t.gradient_checkpointing:  # after make_trainable: PEFT refuses to add a prefix to a checkpointed model
        enable_gradient_checkpointing(model)
    if t.neftune_noise_alpha:
        add_neftune(model, t.neftune_noise_alpha)
    continued.load_init_weights(model, cfg, method, resumed=resume_path is not None)
    ep_size = deepspeed_config.expert_parallel_size(ds_config)
    for line in moe.prepare(model, deepspeed_config.zero_stage(ds_config), cfg.model.experts_implementation, ep_size):
        log(line)
    trainable, total = count_parameters(model)
    log(
        f"method={cfg.method.finetuning_type} trainable params {trainable:,} / {total:,} "
        f"({100 * trainable / total:.2f}%); zero stage {deepspeed_config.zero_stage(ds_config)}; "
        f"{len(train_examples)} train / {sum(map(len, eval_sets.values()))} eval samples; "
        f"{total_steps} steps of {sampler.global_batch} samples"
    )
    offload = deepspeed_config.is_offload(ds_config)
    if ep_size > 1:  # built by DeepSpeed once AutoEP replaced the experts
        optimizer = expert_parallel_optimizer(t, offload)
        scheduler = lambda opt: build_scheduler(opt, t, total_steps)  # noqa: E731
    else:
        optimizer = build_optimizer(model, t, offload)
        scheduler = build_scheduler(optimizer, t, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    continued.load_init_optimizer(engine, cfg, method, resumed=resume_path is not None)
    objective = build_objective(cfg, ds_config, device, tokenizer, engine.module, inputs.teacher)
    # A chain, not `train_examples + [...]`: that would copy every memory-mapped row into Python lists.
    objective.check_rows(itertools.chain(train_examples, *eval_sets.values()))
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        tokenizer=tokenizer,
        train_examples=train_examples,
        eval_sets=eval_sets,
        sampler=sampler,
        total_steps=total_steps,
        ds_config=ds_config,
        method=method,
        engine=engine,
        eos_ids=generation_eos_ids(cfg.model.model_name_or_path, tokenizer),
        num_params=total,
        objective=objective,
        routing=moe.RoutingStats(engine.module),
        resume_path=resume_path,
        resume_tag=resume_tag,
    )


def init_output_dir(cfg: Config, resume_path: Path | None) -> None:
    """Rank 0 creates output_dir (clearing old checkpoints only when told to) and records the config."""
    t, out = cfg.train, Path(cfg.train.output_dir)
    if collectives.is_main_process():
        if t.overwrite_output_dir and not resume_path:
            for _, old in checkpoints.list_checkpoints(t.output_dir):
                shutil.rmtree(old)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    collectives.barrier()  # every rank may write into output_dir from here on


def train(cfg: Config, inputs: Inputs | None = None) -> dict:
    t = cfg.train
    if missing := check_installed(t.report_to):  # before any model loads
        raise UserError(missing)
    run = setup(cfg, inputs or validate_inputs(cfg, environment.world_size_from_env()))
    engine, rank = run.engine, run.rank
    init_output_dir(cfg, run.resume_path)
    state = resume_state(run)
    start_step = state.global_step
    log_memory_per_rank(run)

    logger = MetricsLogger(t.output_dir, enabled=rank == 0, resume_step=start_step)
    logger.log_config((Path(t.output_dir) / "config.yaml").read_text(encoding="utf-8"))
    settings = run_settings(cfg, run.world, deepspeed_config.zero_stage(run.ds_config), run.total_steps)
    # Collective: only rank 0 opens the trackers; when one cannot start, every rank stops here together.
    if tracker_problems := collectives.broadcast_object(logger.start_run(cfg, settings)):
        raise UserError(tracker_problems)
    clip = takes_over_clipping(engine, run.world, t.max_grad_norm)
    guard = StepGuard(state, t.max_nonfinite_steps, t.loss_spike_factor)
    window = ThroughputWindow(train_flops_per_token(run.num_params, engine.module.config), run.world)
    bar = Progress(run.total_steps, start_step, enabled=rank == 0 and not t.disable_tqdm, every=t.logging_steps)
    results, evaluated_at = {}, None
    watch = PreemptionWatch()
    if run.eval_sets and t.eval_on_start and start_step == 0:
        run_eval(run, logger, results, step=0)
    prefetch = Prefetcher(lambda s: step_batches(run, s, rank), pin=pin_on(run.device))
    for step in range(start_step + 1, run.total_steps + 1):
        t0 = time.perf_counter()
        micro = prefetch.get(step, step + 1 if step < run.total_steps else None)
        result = train_step(engine, micro, run.world, run.device, clip, guard, run.objective, run.routing)
        state.global_step = step
        counted = result.skipped is None and not result.overflow
        # Collective where the model has routers and the rate is set; a step that was not applied moves no bias.
        run.routing.update_biases(t.router_bias_update_rate if counted else 0.0, collectives.all_reduce_sum)
        if counted:
            window.add(result.loss, result.grad_norm, result.nonpad_tokens, time.perf_counter() - t0, result.parts)
        bar.update(result.loss, engine.get_lr()[0], counted)
        note_skipped_step(run, state, guard, logger, step, result)

        if (step % t.logging_steps == 0 or step == run.total_steps) and window.steps:
            record = window.flush(engine.get_lr()[0], epoch=step / run.sampler.steps_per_epoch)
            if engine.fp16_enabled():
                record["train/loss_scale"] = loss_scale(engine)
            record.update(run.routing.flush(collectives.all_reduce_sum))  # collective, where the model has routers
            logger.log(step, record)
            results.update(record)
            logger.stop_if_unwritable(step, rank)  # collective: a refused log write stops every rank here

        # The last step's eval comes after the final export (in finish), so no eval failure can lose the run.
        should_stop = False
        if run.eval_sets and t.eval_steps and step % t.eval_steps == 0 and step < run.total_steps:
            record, evaluated_at = run_eval(run, logger, results, step), step
            # Every rank holds the same all-reduced metrics, so every rank decides the same.
            should_stop = state.record_eval(record, step, t.metric_for_best_model, t.early_stopping_patience)
        preempted = watch.requested()  # collective: every rank agrees, so all save and exit together
        if (t.save_steps and step % t.save_steps == 0) or should_stop or preempted:
            saved = checkpoints.save_checkpoint(engine, cfg, state, run.method.trainable_only, run.total_steps)
        if preempted:
            prefetch.close()
            bar.close()
            logger.close()
            exit_preempted(saved, step, rank)
        if should_stop:
            log(
                f"early stopping at step {step}: eval {t.metric_for_best_model} has not improved for "
                f"{t.early_stopping_patience} evals (best {state.best_metric:.4f} at step {state.best_step})"
            )
            break
    prefetch.close()
    bar.close()
    return finish(run, state, logger, results, evaluated_at)


def step_batches(run: Run, step: int, rank: int) -> list[dict]:
    """This rank's collated micro-batches of optimizer step `step` (from 1)."""
    pad = run.tokenizer.pad_token_id
    return [
        run.objective.collate([run.train_examples[i] for i in idx], pad)
        for idx in run.sampler.micro_batches(step - 1, rank)
    ]


def note_skipped_step(run, state: TrainerState, guard: StepGuard, logger, step: int, result: StepResult) -> None:
    """An update that did not reach the weights is counted and logged: an fp16 overflow (the loss
    scaler's own skip) or the guard's (which raises Diverged after too many in a row)."""
    if result.overflow:
        state.overflow_steps += 1
        scale = loss_scale(run.engine)
        log(f"step {step}: fp16 gradients overflowed; the loss scaler skipped the update, scale now {scale:g}")
        logger.log(step, {"train/overflow_steps": state.overflow_steps, "train/loss_scale": scale})
        return
    out = run.cfg.train.output_dir
    last_saved = (checkpoints.list_checkpoints(out) or [(0, None)])[-1][1] if result.skipped else None
    if note := guard.record(step, result.loss, result.grad_norm, result.skipped, last_saved):
        log(note)
        logger.log(step, {"train/skipped_steps": state.skipped_steps})


def resume_state(run: Run) -> TrainerState:
    """Collective: the trainer state to start from, with the engine restored when resuming."""
    if not run.resume_path:
        return TrainerState()
    state, saved_world = checkpoints.load_checkpoint(
        run.engine, run.resume_path, run.method.trainable_only, run.resume_tag
    )
    how = ""
    if run.resume_tag == checkpoints.UNIVERSAL_TAG:
        how = f" (written by {saved_world} ranks, loaded through its universal conversion)"
    log(f"resumed from {run.resume_path} at step {state.global_step}{how}")
    saved_total = checkpoints.saved_total_steps(run.resume_path)
    if saved_total is not None and saved_total != run.total_steps:
        # The schedule is a function of the total: a new total bends the curve from here on.
        log(
            f"WARNING: this run has {run.total_steps} steps where the checkpoint's had {saved_total}: the "
            f"learning-rate schedule is recomputed for {run.total_steps} steps, so from step {state.global_step} "
            f"the rate is {run.engine.get_lr()[0]:.3g} instead of continuing the old curve; keep max_steps (and "
            "num_train_epochs) as they were to continue the same run exactly"
        )
    return state


def log_memory_per_rank(run: Run) -> None:
    # Collective: every rank reports its own memory; rank 0 prints them in one line.
    per_rank = ", ".join(f"{m:.2f}" for m in collectives.all_gather_objects(round(memory_gb(), 2)))
    kind = "peak allocated" if run.device.type == "cuda" else "peak RSS"
    log(f"memory after setup, per rank: {per_rank} GiB ({kind})")


def exit_preempted(saved: Path, step: int, rank: int) -> None:
    if rank == 0:  # one marker for the whole job: the Slurm template requeues on it
        mark_for_requeue(saved)
    log(
        f"preempted at step {step}: {saved} is complete; exiting with code {PREEMPTED_EXIT} so the "
        "scheduler can requeue the job; rerun with --resume_from_checkpoint=auto to continue"
    )
    raise Preempted()


def finish(run: Run, state: TrainerState, logger: MetricsLogger, results: dict, evaluated_at: int | None) -> dict:
    """Collective: the final export first, then the last eval (unless the loop just ran it), then the
    results. A failure in that eval is reported as such; the trained model is already safe on disk."""
    t = run.cfg.train
    out = Path(t.output_dir)
    export_final(run.engine, run.method, run.tokenizer, out, run.cfg.model.model_name_or_path)
    log(f"final model saved in {out}")
    if run.eval_sets and evaluated_at != state.global_step:
        try:
            record = run_eval(run, logger, results, state.global_step)
        except Exception:
            traceback.print_exc()
            raise FinalEvalFailed(out) from None
        state.record_eval(record, state.global_step, t.metric_for_best_model, t.early_stopping_patience)
    results.update(global_step=state.global_step)
    if state.best_eval_loss is not None:
        results["best_eval_loss"] = state.best_eval_loss
    if state.best_metric is not None:
        results.update(best_metric=state.best_metric, best_step=state.best_step)
        results["metric_for_best_model"] = t.metric_for_best_model
    logger.close(results)  # the final metrics to the HParams tab and the trackers
    if run.rank == 0:  # one writer for the shared output_dir
        (out / "all_results.json").write_text(json.dumps(json_safe(results), indent=2))
        if t.plot_loss:
            from dist_glm.training.plots import plot_runs

            log("plots: " + ", ".join(p.name for p in plot_runs([out], out)))
    log(f"done: final model and results in {out}")
    collectives.barrier()
    return results


def run_eval(run: Run, logger: MetricsLogger, results: dict, step: int) -> dict:
    """Collective: eval loss (and generation metrics) on every eval set; logged (`eval/loss` for one
    unnamed set, `eval/NAME/loss` for named ones), printed and merged into `results`. Returns the first
    set's metrics under plain `eval/...` names: early stopping and the best metric follow that set."""
    t = run.cfg.train
    record, first = {}, None
    for name, examples in run.eval_sets.items():
        part = eval_loss(
            run.engine, examples, t.per_device_eval_batch_size, run.tokenizer.pad_token_id, run.device, run.objective
        )
        if t.predict_with_generate:
            zero3 = deepspeed_config.zero_stage(run.ds_config) == 3  # ZeRO-3 ranks must keep stepping together
            preds, gen = predict(
                run.engine,
                examples,
                run.tokenizer,
                t.per_device_eval_batch_size,
                t.generation_max_new_tokens,
                run.eos_ids,
                zero3,
                run.device,
            )
            part.update(gen)
            if run.rank == 0:
                file = f"generated_predictions{'_' + name if name else ''}.jsonl"
                write_predictions(Path(t.output_dir) / file, examples, preds)
        first = first or part
        record.update({k.replace("eval/", f"eval/{name}/", 1) if name else k: v for k, v in part.items()})
    logger.log(step, record)
    results.update(record)
    log(f"eval at step {step}: " + ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in record.items()))
    return first


def export_final(engine, method, tokenizer, out: Path, model_path: str) -> None:
    """Collective: gather the (possibly ZeRO-3 partitioned) trained weights, then rank 0 writes them."""
    from transformers import GenerationConfig

    state_dict = collectives.gather_state_dict(engine.module, trainable_only=method.export_trainable_only)
    state_dict = moe.gather_expert_parallel(engine.module, state_dict)  # collective; the HF names back
    if collectives.is_main_process():
        model = engine.module
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = True  # turned off for training; the exported model should generate fast
        method.save_artifact(model, state_dict, tokenizer, out)
        if not method.export_trainable_only:
            # The base's own generation config (GLM's several eos ids); a model built with
            # train_from_scratch only has a default one derived from config.json.
            try:
                generation = GenerationConfig.from_pretrained(model_path)
            except OSError:
                generation = base.generation_config
            if generation is not None:
                generation.use_cache = True
                generation.save_pretrained(out)
            if carried := moe.carry_unloaded_tensors(model_path, out):
                log(carried)
        as_umask_allows(out)
    collectives.barrier()


def write_predictions(path: Path, examples, predictions: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e, p in zip(examples, predictions, strict=True):
            f.write(json.dumps({"prediction": p, "reference": e.reference}, ensure_ascii=False) + "\n")

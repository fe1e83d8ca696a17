"""The entry-point layer: every command (launch/*.py and the dist-glm-* console scripts) starts here.

Each command is its `config.Command` (what it reads) plus a body. `run_command` does what all of them
share: `--help`, the process settings that must precede the libraries' import, the one argument loader,
and turning a user's mistake (UserError) into one line per problem and exit code 2, never a traceback.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path

from dist_glm.errors import EXIT_USER_ERROR, UserError


def report_and_exit(err: UserError, prog: str) -> None:
    """Print each problem on its own line to stderr and exit 2.

    Every rank validates the same inputs and so raises the same error; only rank 0 prints so that
    a 16-rank job does not show the message 16 times (unless the error is this rank's own).
    """
    from dist_glm.runtime.environment import rank_from_env

    if rank_from_env() == 0 or err.every_rank:
        for problem in err.problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def start_process() -> None:
    """Settings every command needs before torch, DeepSpeed or transformers is imported."""
    from dist_glm.runtime.doctor import extensions_dir, quiet_known_noise
    from dist_glm.runtime.environment import quiet_other_ranks, use_cpu_accelerator_if_no_gpu

    # torch's C++ layer prints a stack trace on every rendezvous retry; our preflight says what failed.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # DeepSpeed's op builds go to this environment's own folder, not the ~/.cache one every environment
    # (and, through a shared home, every node) shares and fights over the build lock of.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    from dist_glm.runtime.ops import watch_build_locks

    watch_build_locks(extensions_dir(), os.environ.get("RANK", ""))
    quiet_known_noise()
    use_cpu_accelerator_if_no_gpu()
    quiet_other_ranks()


def run_command(command, argv: list[str] | None, body: Callable, parse: bool = True, exit_codes: dict | None = None):
    """--help, start-up, parse into sections, run `body(sections)`; UserError -> one line each, exit 2.
    parse=False hands `body` the argv instead (training parses it itself, to report the config's problems
    together with those of the files it names). `exit_codes` maps other exception types to an exit code
    (their message printed as one line)."""
    from dist_glm import config, options

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(options.help_text(command))
        return
    start_process()
    try:
        body(config.load_command(argv, command) if parse else argv)
    except UserError as err:
        report_and_exit(err, prog=command.prog)
    except tuple((exit_codes or {}).keys()) as err:
        if str(err):  # a preemption has said what it did already
            print(f"{command.prog}: error: {err}", file=sys.stderr)
        sys.exit(exit_codes[type(err)])
    finally:
        from dist_glm.runtime.environment import destroy

        destroy()


def train_main(argv: list[str] | None = None) -> None:
    from dist_glm import config

    def body(argv):
        from dist_glm.runtime.environment import rank_from_env, world_size_from_env
        from dist_glm.training.checks import validate_inputs
        from dist_glm.training.loop import train

        notes = []
        cfg, problems = config.collect_config(argv, notes=notes)
        if not problems:
            from dist_glm.methods import get_method
            from dist_glm.models.loading import leave_out_bitsandbytes

            leave_out_bitsandbytes(cfg, get_method(cfg.method.finetuning_type))
        if rank_from_env() == 0:  # every rank parsed the same recipe
            for note in notes:
                print(f"[dist_glm] note: {note}", flush=True)
        # The config's own problems and those of the files it names, reported together.
        train(cfg, validate_inputs(cfg, world_size_from_env(), problems))

    from dist_glm.checkpointing.checkpoints import SaveFailed
    from dist_glm.runtime.preemption import PREEMPTED_EXIT, Preempted
    from dist_glm.training.guard import Diverged
    from dist_glm.training.loop import FinalEvalFailed
    from dist_glm.training.telemetry import OutputUnwritable

    # Preempted: the checkpoint is complete on every rank and the scheduler should requeue the job.
    # FinalEvalFailed: the traceback above says why; the trained model is safe.
    # Diverged: too many non-finite steps in a row; the message names the last good checkpoint.
    # SaveFailed: a checkpoint could not be written (full disk, quota); the message says what is intact.
    # OutputUnwritable: output_dir refused the logs mid-run (read-only); every rank stops, checkpoints intact.
    exit_codes = {Preempted: PREEMPTED_EXIT, FinalEvalFailed: 1, Diverged: 1, SaveFailed: 1, OutputUnwritable: 1}
    run_command(config.TRAIN, argv, body, parse=False, exit_codes=exit_codes)


# Checks about training alone (evaluation during it): a tool that only reads a recipe's data ignores them.
TRAINING_ONLY = ("predict_with_generate needs", "eval_steps needs", "early_stopping_patience needs")


def recipe_config(sections, eval_data: bool = True, output_dir: bool = True, training: bool = True):
    """A training recipe's Config for a tool that reads one (prepare, distill_cache, distill_generate):
    its values checked, dataset names/folders/globs resolved and the data files checked, all problems
    raised together."""
    from dist_glm import config
    from dist_glm.data.registry import resolve_and_check

    cfg = config.Config(**{name: sections[name] for name in config.SECTIONS})
    problems = [p for p in config.check_values(cfg) if output_dir or not p.startswith("output_dir")]
    problems = [p for p in problems if training or not p.startswith(TRAINING_ONLY)]
    problems += resolve_and_check(cfg.data, eval_data)
    if problems:
        raise UserError(problems)
    return cfg


def prepare_main(argv: list[str] | None = None) -> None:
    """Tokenize `dataset` and `eval_dataset` of a recipe into the shared cache, without training;
    `--show_samples=N` prints the first N samples with their trained spans marked."""
    import dataclasses

    from dist_glm import config
    from dist_glm.data.loading import PrepareArgs

    command = dataclasses.replace(
        config.TRAIN,
        prog="prepare.py",
        usage="prepare.py CONFIG.yaml [--show_samples=N] [--dump_samples=FILE.jsonl] [--key=value ...]",
        sections={**config.TRAIN.sections, "prepare": (PrepareArgs, None)},
    )

    def body(sections):
        from dist_glm.data.loading import load_datasets, render_trained_spans
        from dist_glm.models.loading import load_tokenizer

        cfg = recipe_config(sections, output_dir=False, training=False)  # tokenizing needs neither
        dump = sections["prepare"].dump_samples
        if dump and Path(dump).exists():
            raise UserError(f"dump_samples='{dump}' already exists; name a new file (nothing is overwritten)")
        if dump and not Path(dump).resolve().parent.is_dir():
            raise UserError(f"dump_samples='{dump}': its folder does not exist; create it or name another file")
        from dist_glm.data.preference import as_rows

        tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
        samples = as_rows(load_datasets(cfg, tokenizer).samples)  # a pair shows as its chosen, then rejected row
        for i, example in enumerate(samples[: sections["prepare"].show_samples]):
            print(f"\n--- sample {i + 1} " + render_trained_spans(example, tokenizer), flush=True)
        if dump:
            write_samples(samples, tokenizer, Path(dump))
            print(f"[dist_glm] wrote {len(samples)} samples to {dump}", flush=True)

    run_command(command, argv, body)


def write_samples(samples, tokenizer, path) -> None:
    """One JSON object per sample, written beside `path` and renamed into place when complete."""
    import json

    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for example in samples:
            ids, labels = [int(i) for i in example.input_ids], [int(x) for x in example.labels]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            f.write(json.dumps({"text": text, "input_ids": ids, "labels": labels}, ensure_ascii=False) + "\n")
    tmp.rename(path)


def _recipe_tool_main(argv, prog: str, usage: str, description: str, build) -> None:
    """A command that reads a training recipe and builds something from its rows ahead of training
    (`build(cfg)`: the teacher cache, the reference cache)."""
    import dataclasses

    from dist_glm import config

    command = dataclasses.replace(config.TRAIN, prog=prog, usage=usage, description=description, default_yaml=None)
    run_command(command, argv, lambda sections: build(recipe_config(sections)))


def distill_cache_main(argv: list[str] | None = None) -> None:
    """Run a recipe's teacher once over its training rows and eval sets and cache its top-k logits per
    trainable token (launch/distill_cache.py); training with distill_cache=DIR then loads no teacher."""

    def build(cfg):
        from dist_glm.tools.distill_cache import build_from_recipe

        build_from_recipe(cfg)

    _recipe_tool_main(
        argv,
        "distill_cache.py",
        "distill_cache.py RECIPE.yaml --teacher_model_name_or_path=DIR --distill_cache=DIR [--distill_top_k=64]",
        "Writes the teacher cache that training with --distill_cache=DIR reads (docs/distillation.md).",
        build,
    )


def ref_cache_main(argv: list[str] | None = None) -> None:
    """Run a preference recipe's reference model once over its rows and cache each row's log-probability
    (launch/ref_cache.py); training with ref_logps_cache=DIR then loads no reference model."""

    def build(cfg):
        from dist_glm.tools.ref_cache import build_from_recipe

        build_from_recipe(cfg)

    _recipe_tool_main(
        argv,
        "ref_cache.py",
        "ref_cache.py RECIPE.yaml --ref_logps_cache=DIR [--ref_model=DIR] [--key=value ...]",
        "Writes the reference cache that training with --ref_logps_cache=DIR reads (docs/preference.md).",
        build,
    )


def distill_generate_main(argv: list[str] | None = None) -> None:
    """Sequence-level distillation: the teacher answers a recipe's prompts into a new dataset
    (launch/distill_generate.py)."""
    import dataclasses

    from dist_glm import config
    from dist_glm.tools.distill_generate import GenerateArgs

    command = dataclasses.replace(
        config.TRAIN,
        prog="distill_generate.py",
        usage="distill_generate.py RECIPE.yaml --teacher_model_name_or_path=DIR --output_file=FILE [--key=value ...]",
        description="Writes the teacher's answers to the recipe's prompts as a dataset (docs/distillation.md).",
        default_yaml=None,
        sections={**config.TRAIN.sections, "generate": (GenerateArgs, None)},
    )

    def body(sections):
        from dist_glm.tools.distill_generate import generate_dataset

        # It writes output_file, not output_dir, and answers only the training prompts.
        generate_dataset(recipe_config(sections, eval_data=False, output_dir=False), sections["generate"])

    run_command(command, argv, body)


def evaluate_main(argv: list[str] | None = None) -> None:
    """Loss/perplexity and generation metrics of a trained result on an eval set (launch/evaluate.py)."""
    from dist_glm.tools.evaluate import EVALUATE

    def body(s):
        from dist_glm.tools.evaluate import evaluate_artifact

        evaluate_artifact(s["model"], s["evaluate"], s["data"])

    run_command(EVALUATE, argv, body)


def export_main(argv: list[str] | None = None) -> None:
    """Merge an adapter or consolidate a checkpoint into a standalone HF model (launch/export.py)."""
    from dist_glm.tools.export import EXPORT

    def body(s):
        from dist_glm.tools.export import export

        export(s["model"], s["export"])

    run_command(EXPORT, argv, body)


def serve_main(argv: list[str] | None = None) -> None:
    """The OpenAI-compatible server (launch/serve.py)."""
    from dist_glm.tools.serve import SERVE

    def body(s):
        from dist_glm.tools.serve import serve

        serve(s["model"], s["serve"])

    run_command(SERVE, argv, body)


def chat_main(argv: list[str] | None = None) -> None:
    """Interactive, streaming chat with a trained result (launch/chat.py)."""
    from dist_glm.tools.chat import CHAT

    def body(s):
        from dist_glm.tools.chat import ChatSession, GenerationFailed, chat_loop, check_sampling

        model_args, args = s["model"], s["chat"]
        problems = check_sampling(args)
        if problems:
            raise UserError(problems)
        try:
            session = ChatSession(model_args, args)
        except KeyboardInterrupt:  # Ctrl-C while the model loads
            sys.exit(130)
        try:
            chat_loop(session)
        except GenerationFailed as err:  # e.g. settings the model's generate() rejects
            raise UserError(str(err)) from None

    run_command(CHAT, argv, body)


def plot_main(argv: list[str] | None = None) -> None:
    """Overlay several runs' curves (launch/plot.py OUTPUT_DIR... [--out_dir=DIR])."""
    from dataclasses import dataclass
    from pathlib import Path

    from dist_glm import config

    @dataclass
    class PlotArgs:
        out_dir: str = config.option("plots", "Where training_loss.png and eval_*.png go.")
        smoothing: float = config.option(0.6, "TensorBoard-style smoothing weight of the training loss, in [0, 1).")

    command = config.Command(
        prog="plot.py",
        usage="plot.py OUTPUT_DIR [OUTPUT_DIR ...] [--out_dir=plots] [--smoothing=0.6]",
        sections={"plot": (PlotArgs, None)},
        description="Each OUTPUT_DIR is a training run's output_dir (its metrics.jsonl).",
    )
    argv = sys.argv[1:] if argv is None else argv
    runs = [a for a in argv if not a.startswith("--")]

    def body(sections):
        from dist_glm.training.plots import plot_runs

        args = sections["plot"]
        problems = [] if runs else ["give one or more training output directories: plot.py OUTPUT_DIR ..."]
        problems += [
            f"'{r}': no metrics.jsonl there; pass a training run's output_dir"
            for r in runs
            if not (Path(r) / "metrics.jsonl").is_file()
        ]
        if not 0 <= args.smoothing < 1:
            problems.append(f"smoothing={args.smoothing} must be in [0, 1)")
        if problems:
            raise UserError(problems)
        for path in plot_runs([Path(r) for r in runs], Path(args.out_dir), args.smoothing):
            print(path)

    run_command(command, [a for a in argv if a.startswith("--")], body)


def plan_main(argv: list[str] | None = None) -> None:
    """Per-rank memory of a training recipe under each ZeRO stage and offload choice (docs/planning.md)."""
    from dist_glm import config
    from dist_glm.planning.planner import check, plan_command, render

    argv = sys.argv[1:] if argv is None else argv
    recipe = next((a for a in argv if not a.startswith("--")), "the command line")

    def body(sections):
        from dist_glm.planning.trace import known_config_dir, trace

        cfg = config.Config(**{name: sections[name] for name in config.SECTIONS})
        args = sections["plan"]
        problems = check(cfg, args)
        shipped = known_config_dir(cfg.model.model_name_or_path, args.model)
        if args.model and shipped is None:
            problems.append(f"model='{args.model}': no such shipped config in assets/model_configs")
        if problems:
            raise UserError(problems)
        if shipped is not None:
            print(f"[dist_glm] planning from the shipped config.json of {shipped.name} ({shipped}/config.json)")
            cfg.model.model_name_or_path = str(shipped)
        print(render(trace(cfg), cfg, args, recipe))

    run_command(plan_command(), argv, body)


def doctor_main(argv: list[str] | None = None) -> None:
    """This environment next to what CI tested (`--brief`: one line)."""
    from dist_glm.runtime import doctor

    sys.exit(doctor.main(argv))


def supervise_main(argv: list[str] | None = None) -> None:
    """Run a launcher so that a preemption signal waits for the ranks' checkpoint (dist_glm.runtime.supervise)."""
    from dist_glm.runtime import supervise

    supervise.main(argv)

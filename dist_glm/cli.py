"""Entry points shared by launch/*.py and the console scripts in setup.py."""

import sys

from dist_glm.errors import UserError, report_and_exit


def train_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from dist_glm import config

    if "-h" in argv or "--help" in argv:
        print(config.help_text())
        return
    import os

    # torch's C++ layer prints a stack trace on every rendezvous retry; our preflight says what failed.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from dist_glm.distributed import destroy, quiet_other_ranks, use_cpu_accelerator_if_no_gpu
    from dist_glm.preemption import PREEMPTED_EXIT, Preempted

    use_cpu_accelerator_if_no_gpu()
    quiet_other_ranks()
    try:
        cfg, problems = config.collect_config(argv)
        from dist_glm.distributed import world_size_from_env
        from dist_glm.train import FinalEvalFailed, train, validate_inputs

        # The config's own problems and those of the files it names, reported together.
        inputs = validate_inputs(cfg, world_size_from_env(), problems)
        train(cfg, inputs)
    except UserError as err:
        report_and_exit(err, prog="train.py")
    except Preempted:  # the checkpoint is complete on every rank; the scheduler should requeue
        sys.exit(PREEMPTED_EXIT)
    except FinalEvalFailed as err:  # the traceback above says why; the trained model is safe
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        destroy()


def prepare_main(argv: list[str] | None = None) -> None:
    """Tokenize `dataset` and `eval_dataset` of a recipe into the shared cache, without training."""
    argv = sys.argv[1:] if argv is None else argv
    from dist_glm import config

    if "-h" in argv or "--help" in argv:
        print(config.help_text().replace("train.py", "prepare.py"))
        return
    try:
        cfg = config.load_config(argv)
        from dist_glm.data.formats import check_data_paths
        from dist_glm.data.loading import load_datasets
        from dist_glm.models import load_tokenizer

        problems = check_data_paths(cfg.data.dataset, "dataset") + check_data_paths(
            cfg.data.eval_dataset, "eval_dataset"
        )
        if problems:
            raise UserError(problems)
        load_datasets(cfg, load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code))
    except UserError as err:
        report_and_exit(err, prog="prepare.py")


# ---------------------------------------------------------------- evaluate, chat, export


def load_tool_args(
    argv: list[str], schemas: list[tuple[type, tuple[str, ...] | None]], flag_only: tuple[str, ...] = ()
) -> list:
    """`[RECIPE.yaml] [--key=value ...]` into one instance per (dataclass, accepted keys or None = all).

    Defaults < YAML < command line, as for training. The YAML may be a training recipe: keys this tool
    does not take are ignored there (a recipe sets many), while on the command line they are errors.
    `flag_only` keys mean something else in a recipe (its output_dir is the training run's) and are
    taken from the command line only.
    """
    import dataclasses
    import difflib

    from dist_glm import config

    yaml_path, overrides, problems = config.parse_cli(argv)
    fields = {
        f.name: (i, f)
        for i, (cls, keys) in enumerate(schemas)
        for f in dataclasses.fields(cls)
        if keys is None or f.name in keys
    }
    values: list[dict] = [{} for _ in schemas]
    layers = [(config.load_yaml(yaml_path), yaml_path, False)] if yaml_path else []
    for mapping, source, strict in layers + [(overrides, "command line", True)]:
        for key, raw in mapping.items():
            if key not in fields or (key in flag_only and not strict):
                if strict:
                    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the valid keys"
                    problems.append(f"{source}: unknown key '{key}'{hint}")
                continue
            i, f = fields[key]
            try:
                values[i][key] = _convert(raw, f.type)
            except ValueError as e:
                problems.append(f"{source}: {key}={raw!r} {e}")
    if problems:
        raise UserError(problems)
    return [cls(**v) for (cls, _), v in zip(schemas, values, strict=True)]


def _convert(value, tp):
    """A YAML or command-line value as the field's type (bool, int, float, str, or one of those | None)."""
    import types
    import typing

    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return str(value).lower() in ("true", "1", "yes", "on")
        raise ValueError("is not a boolean; use true or false")
    if tp in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"is not {'an integer' if tp is int else 'a number'}") from None
        if tp is int and (isinstance(value, bool) or not number.is_integer()):
            raise ValueError("is not an integer")
        return int(number) if tp is int else number
    return "" if value is None else str(value)


def tool_help(usage: str, schemas: list[tuple[type, tuple[str, ...] | None]]) -> str:
    import dataclasses
    import json

    lines = [f"usage: {usage}", "", "A training recipe (YAML) may come first; flags override it.", ""]
    for cls, keys in schemas:
        for f in dataclasses.fields(cls):
            if keys is None or f.name in keys:
                lines.append(f"  --{f.name}={json.dumps(f.default)}\n      {f.metadata['help']}")
    return "\n".join(lines)


def _eval_schemas():
    from dist_glm.config import DataConfig
    from dist_glm.inference import EVAL_DATA_KEYS, EvaluateArgs

    return [(EvaluateArgs, None), (DataConfig, EVAL_DATA_KEYS)]


def evaluate_main(argv: list[str] | None = None) -> None:
    """Loss/perplexity and generation metrics of a trained result on an eval set (launch/evaluate.py)."""
    argv = sys.argv[1:] if argv is None else argv
    schemas = _eval_schemas()
    if "-h" in argv or "--help" in argv:
        print(tool_help("evaluate.py [RECIPE.yaml] --model_name_or_path=DIR --eval_dataset=FILE [...]", schemas))
        return
    import os

    # torch's C++ layer prints a stack trace on every rendezvous retry; our preflight says what failed.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from dist_glm.distributed import destroy, quiet_other_ranks, use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    quiet_other_ranks()
    try:
        args, data_cfg = load_tool_args(argv, schemas, flag_only=("output_dir",))
        from dist_glm.inference import evaluate

        evaluate(args, data_cfg)
    except UserError as err:
        report_and_exit(err, prog="evaluate.py")
    finally:
        destroy()


def export_main(argv: list[str] | None = None) -> None:
    """Merge an adapter or consolidate a checkpoint into a standalone HF model (launch/export.py)."""
    argv = sys.argv[1:] if argv is None else argv
    from dist_glm.export import ExportArgs

    if "-h" in argv or "--help" in argv:
        print(
            tool_help(
                "export.py --model_name_or_path=DIR [--adapter_name_or_path=DIR] --export_dir=DIR", [(ExportArgs, None)]
            )
        )
        return
    from dist_glm.distributed import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    try:
        (args,) = load_tool_args(argv, [(ExportArgs, None)])
        from dist_glm.export import export

        export(args)
    except UserError as err:
        report_and_exit(err, prog="export.py")


CHAT_HELP = "commands: 'clear' starts a new conversation, 'exit' (or Ctrl-D) quits; Ctrl-C stops a reply"


def chat_main(argv: list[str] | None = None) -> None:
    """Interactive, streaming chat with a trained result (launch/chat.py)."""
    argv = sys.argv[1:] if argv is None else argv
    from dist_glm.chat import ChatArgs

    if "-h" in argv or "--help" in argv:
        print(
            tool_help(
                "chat.py --model_name_or_path=DIR [--adapter_name_or_path=DIR] [--system=TEXT]", [(ChatArgs, None)]
            )
        )
        print(f"\n{CHAT_HELP}")
        return
    from dist_glm.distributed import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    try:
        (args,) = load_tool_args(argv, [(ChatArgs, None)])
        from dist_glm.chat import ChatSession, check_sampling
        from dist_glm.inference import check_model_args

        problems = check_model_args(args) + check_sampling(args)
        if problems:
            raise UserError(problems)
        session = ChatSession(args)
    except UserError as err:
        report_and_exit(err, prog="chat.py")
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        sys.exit(130)
    chat_loop(session)


def chat_loop(session) -> None:
    import threading

    from dist_glm.chat import GenerationFailed

    print(f"[dist_glm] chatting with {session.source}; {CHAT_HELP}", flush=True)
    if session.args.system:
        print(f"[dist_glm] system prompt: {session.args.system}", flush=True)
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / end of piped input, or Ctrl-C at the prompt
            print()
            return
        if query in ("exit", "quit"):
            return
        if query == "clear":
            session.clear()
            print("[dist_glm] history cleared", flush=True)
            continue
        if not query:
            continue
        print("Assistant: ", end="", flush=True)
        stop = threading.Event()
        pieces = session.reply(query, stop)
        try:
            for piece in pieces:
                print(piece, end="", flush=True)
        except GenerationFailed as err:
            print(flush=True)
            report_and_exit(UserError(str(err)), prog="chat.py")
        except KeyboardInterrupt:  # stop this reply but keep the session; the round is left out of the history
            stop.set()
            for _ in pieces:  # let generation notice the stop and finish before the next prompt
                pass
            print(" [interrupted]", end="")
        print(flush=True)

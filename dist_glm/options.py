"""The loader every command uses: typed option sections from YAML, overridden by `--key=value`.

Defaults < YAML < command line, one converter, `Literal[...]` choices checked generically,
did-you-mean, every problem in one error, one `--help` format. The sections themselves live next to
the code that reads them (training's in dist_glm.config).
"""

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from dist_glm import llamafactory
from dist_glm.errors import UserError


def option(default, help: str):
    """A dataclass field whose help text becomes `--help` output."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Flags a launcher appends that are not configuration (the deepspeed launcher adds --local_rank=N).
LAUNCHER_FLAGS = {"local_rank"}


@dataclass(frozen=True)
class Command:
    """What one command reads: named sections, each a dataclass and the keys taken from it (None: all)."""

    prog: str
    usage: str
    sections: dict[str, tuple[type, tuple[str, ...] | None]]
    description: str = ""
    # Tools accept a training recipe as their YAML: its keys for other commands (these) are ignored
    # there (a recipe sets many), while on the command line they are errors.
    recipe_keys: frozenset[str] = frozenset()
    flag_only: tuple[str, ...] = ()  # keys that mean something else in a recipe (its output_dir is training's)
    default_yaml: Path | None = None  # what runs with no arguments at all

    def fields(self) -> dict[str, tuple[str, dataclasses.Field]]:
        """Flat user-facing name -> (section, field); names are unique across a command's sections."""
        out = {}
        for section, (cls, keys) in self.sections.items():
            for f in dataclasses.fields(cls):
                if keys is None or f.name in keys:
                    assert f.name not in out, f"duplicate option {f.name}"
                    out[f.name] = (section, f)
        return out


def _optional(tp) -> tuple[object, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def convert(name: str, tp, value, source: str):
    """A YAML or command-line value as the field's type: bool, int, float, str, a Literal's choices, or one
    of those | None. Raises ValueError with a one-line message naming the key and what is allowed."""
    tp, optional = _optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        value = convert(name, type(choices[0]), value, source)
        if value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ValueError(f"{source}: {name}={value!r} is not supported; use one of {listed}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{source}: {name}={value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{source}: {name}={value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {name}={value!r} is not an integer") from None
    if tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string, so numbers in strings are accepted here.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {name}={value!r} is not a number") from None
    if value is None:
        return ""
    if isinstance(value, dict):  # a YAML mapping given to a text option holding JSON (lr_scheduler_kwargs)
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _unknown_key_message(key: str, source: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the valid keys"
    return f"{source}: unknown key '{key}'{hint}"


def parse_cli(argv: list[str], command: Command) -> tuple[str | None, dict[str, str], list[str]]:
    """Split argv into (yaml_path, {key: raw_value}, problems). Accepts --k=v, --k v, and a bare --flag
    for a boolean (it means true)."""
    fields = command.fields()
    yaml_path, overrides, problems = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if yaml_path is None:
                yaml_path = arg
            else:
                problems.append(f"command line: unexpected argument '{arg}'; pass options as --key=value")
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key in fields and _optional(fields[key][1].type)[0] is bool:
                value = "true"  # a bare boolean flag switches it on
            elif i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            elif key not in LAUNCHER_FLAGS:
                problems.append(f"command line: --{key} needs a value; write --{key}=VALUE")
                continue
        if key in LAUNCHER_FLAGS:
            continue
        overrides[key] = value
    return yaml_path, overrides, problems


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found; pass the path to a YAML recipe such as configs/demo.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        loc = f":{where.line + 1}" if where else ""
        raise UserError(f"{path}{loc}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def parse_command(argv: list[str], command: Command, notes: list | None = None) -> tuple[dict[str, object], list[str]]:
    """{section: dataclass instance} and every problem found, without raising (a value that does not
    convert keeps its default and is reported). Defaults < YAML < command line. LLaMA-Factory's own keys
    are understood (dist_glm.llamafactory): harmless ones add a line to `notes`."""
    fields = command.fields()
    yaml_path, overrides, problems = parse_cli(argv, command)
    if problems:
        raise UserError(problems)
    if yaml_path is None and not overrides and command.default_yaml is not None:
        yaml_path = str(command.default_yaml)
    layers = [(load_yaml(yaml_path), yaml_path, False)] if yaml_path else []
    layers.append((overrides, "command line", True))
    # A training recipe: LLaMA-Factory's multi-key spellings mean one thing. Not in a config.yaml dist_glm
    # wrote (it dumps every key, preflight_timeout among them, which LLaMA-Factory does not have): there a
    # `quantization_bit: 4` beside `finetuning_type: lora` is the unused default, not QLoRA.
    ours = bool(layers) and "preflight_timeout" in layers[0][0]
    if "finetuning_type" in fields and not ours:
        where = yaml_path or "command line"
        sets, lf_notes, lf_problems = llamafactory.translate({k: v for m, _, _ in layers for k, v in m.items()})
        problems += [f"{where}: {p}" for p in lf_problems]
        if notes is not None:
            notes += [f"{where}: {n}" for n in lf_notes]
        layers.append((sets, "LLaMA-Factory's spelling", False))  # last: what the keys mean together
    values: dict[str, dict] = {name: {} for name in command.sections}
    for mapping, source, from_cli in layers:
        for key, raw in mapping.items():
            if key in fields and (from_cli or key not in command.flag_only):
                section, f = fields[key]
                try:
                    values[section][key] = convert(key, f.type, raw, source)
                except ValueError as e:
                    problems.append(str(e))
            elif (known := llamafactory.check(key, raw)) is not None:
                note, problem = known
                problems += [f"{source}: {problem}"] if problem else []
                if note and notes is not None:
                    notes.append(f"{source}: {note}")
            elif from_cli or key not in command.recipe_keys:
                if not (key in command.flag_only and not from_cli):
                    problems.append(_unknown_key_message(key, source, fields))
    sections = {name: cls(**values[name]) for name, (cls, _) in command.sections.items()}
    return sections, problems


def load_command(argv: list[str], command: Command) -> dict[str, object]:
    """`parse_command` that raises one UserError with every problem."""
    sections, problems = parse_command(argv, command)
    if problems:
        raise UserError(problems)
    return sections


def help_text(command: Command) -> str:
    """`--help` for any command: usage, then every option with its default, meaning and choices."""
    lines = [f"usage: {command.usage}", ""]
    if command.description:
        lines += [command.description, ""]
    for section, (cls, keys) in command.sections.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            if keys is not None and f.name not in keys:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = _optional(f.type)[0]
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
            listed = f" One of: {', '.join(str(c) for c in choices)}." if choices else ""
            lines.append(f"  --{f.name}={json.dumps(default)}\n      {f.metadata['help']}{listed}")
    return "\n".join(lines)

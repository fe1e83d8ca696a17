"""An OpenAI-compatible chat server for a trained GLM (full model or adapter), on FastAPI + uvicorn.

python launch/serve.py --model_name_or_path out/demo --port 8000 [--api_key KEY]

This module is the command line and start-up: check the arguments, listen on the port, load the model
and prove it generates, then hand the socket to uvicorn. The server itself lives in dist_glm.tools.serving:
`engine.py` (one model, one batching worker thread) and `api.py` (the HTTP routes, auth and errors).
"""

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dist_glm.config import Command, option
from dist_glm.data.template import TEMPLATES
from dist_glm.errors import UserError
from dist_glm.models.artifacts import ModelArgs
from dist_glm.tools.serving.api import build_app
from dist_glm.tools.serving.engine import Engine

log = logging.getLogger("dist_glm.serve")
API_KEY_ENV = "DIST_GLM_API_KEY"


@dataclass
class ServeArgs:
    served_model_name: str = option("", "The name clients pass as `model` (default: the model path's last directory).")
    host: str = option("127.0.0.1", "Interface to listen on; 0.0.0.0 for every interface.")
    port: int = option(8000, "TCP port; 0 picks a free one (printed at start).")
    api_key: str | None = option(
        None, f"Require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; empty: no key)."
    )
    max_model_len: int = option(0, "Context limit in tokens, prompt + reply (0: the model's max_position_embeddings).")
    max_batch_size: int = option(16, "Requests generated together in one batch.")
    max_queue_size: int = option(256, "Waiting requests beyond this get 503.")
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    template: str = option(
        "auto",
        "Chat template that renders requests: auto = the one the model was trained with (its config.yaml), "
        "else the model type's (glm4, glm4_0414, chatglm3).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "Server log level.")
    tool_call_arguments: Literal["raw", "validate", "constrained"] = option(
        "raw",
        "raw: a tool call's arguments as the model wrote them (check that they parse, as with OpenAI). validate: "
        "a call is sent only if its arguments are JSON the tool's `parameters` schema accepts; otherwise the reply "
        "comes back as text with `invalid_tool_call` (name, arguments, why) and finish_reason stop. constrained: "
        "the arguments are generated within the schema (and validated). glm4 and glm4_0414 templates.",
    )


SERVE = Command(
    prog="serve.py",
    usage="serve.py --model_name_or_path=DIR [--adapter_name_or_path=DIR] [--port=8000] [--key=value ...]",
    sections={"model": (ModelArgs, None), "serve": (ServeArgs, None)},
    description="An OpenAI-compatible chat server (/v1/chat/completions, /v1/models, /health) for a trained GLM.",
)


def check_args(model: ModelArgs, args: ServeArgs) -> list[str]:
    problems = [] if model.model_name_or_path else ["model_name_or_path is required; point it at a training output"]
    for key in ("model_name_or_path", "adapter_name_or_path"):
        path = getattr(model, key)
        if path and not Path(path).is_dir():
            problems.append(f"{key}='{path}': no such directory; point it at a training output (e.g. out/demo)")
    if not 0 <= args.port <= 65535:
        problems.append(f"port={args.port}: must be in 0..65535 (0 picks a free port)")
    for key in ("max_batch_size", "max_queue_size"):
        if getattr(args, key) < 1:
            problems.append(f"{key}={getattr(args, key)}: must be at least 1")
    if args.max_model_len < 0:
        problems.append(f"max_model_len={args.max_model_len}: must be positive (0: the model's own limit)")
    if args.template not in TEMPLATES:
        problems.append(f"template='{args.template}': use one of {', '.join(TEMPLATES)}")
    if args.tool_call_arguments == "constrained" and importlib.util.find_spec("xgrammar") is None:
        problems.append(
            "tool_call_arguments=constrained needs the xgrammar package: pip install 'dist_glm[constrained]' (on a "
            "CPU-only Linux machine: pip install --no-deps xgrammar apache-tvm-ffi); or use validate"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device='{args.device}': no CUDA device is visible; use --device=cpu")
    elif args.device != "auto" and not args.device.startswith(("cpu", "cuda")):
        problems.append(f"device='{args.device}': use auto, cpu, cuda or cuda:N")
    return problems


def bind(host: str, port: int) -> socket.socket:
    """Listen before the model loads, so a taken port fails in a second, not after a minute of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(
            f"port={port}: cannot listen on {host}:{port} ({e.strerror or e}); pick another --port"
        ) from None
    return sock


def load_engine(model_args: ModelArgs, args: ServeArgs) -> tuple[Engine, int]:
    """(engine, max_model_len) for the checkpoint in args; UserError for anything the user can fix."""
    from dist_glm.models.artifacts import load_for_inference
    from dist_glm.models.loading import generation_eos_ids, load_tokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if model_args.dtype != "auto":
        dtype = getattr(torch, model_args.dtype)
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model = load_for_inference(
        model_args.model_name_or_path,
        model_args.adapter_name_or_path,
        dtype=dtype,
        trust_remote_code=model_args.trust_remote_code,
    )
    if not any(getattr(model, a, False) for a in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit")):
        model.to(device)  # bitsandbytes places quantized weights itself; .to() is refused for them
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokenizer_dirs = [model_args.adapter_name_or_path, model_args.model_name_or_path, base.config.name_or_path]
    tokenizer_dir = next((d for d in tokenizer_dirs if d and (Path(d) / "tokenizer_config.json").is_file()), None)
    if tokenizer_dir is None:
        raise UserError(
            f"model_name_or_path='{model_args.model_name_or_path}': no tokenizer_config.json there or in its base"
        )
    tokenizer = load_tokenizer(tokenizer_dir, model_args.trust_remote_code)
    limit = int(getattr(base.config, "max_position_embeddings", 0) or 0)
    if args.max_model_len and limit and args.max_model_len > limit:
        raise UserError(f"max_model_len={args.max_model_len}: the model was built for at most {limit} positions")
    max_model_len = args.max_model_len or limit or 4096
    template = serving_template(model_args, args.template, base.config.model_type, tokenizer)
    if template is None and not tokenizer.chat_template:
        raise UserError(f"model_name_or_path='{model_args.model_name_or_path}': the tokenizer has no chat template")
    eos_ids = generation_eos_ids(model, tokenizer)
    engine = Engine(model, tokenizer, eos_ids, args.max_batch_size, args.max_queue_size, template)
    # One token through the whole path now: a broken checkpoint fails at start-up, not on the first request.
    with torch.inference_mode():
        hello = {"system": "", "tools": None, "messages": [{"role": "user", "content": "hi"}]}
        ids = engine.encode_conversation(hello) if template else engine.encode_chat(hello["messages"])
        prompt = torch.tensor([ids], device=engine.device)
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1)
    return engine, max_model_len


def serving_template(model_args: ModelArgs, name: str, model_type: str, tokenizer):
    """The training template requests are rendered with, so a served model sees what it was trained on:
    `auto` takes the template recorded in the training output's config.yaml, else the one `auto` picks in
    training (the GLM-4.5-onward formats by the checkpoint's chat_template). None (plain chats through the
    tokenizer's chat_template, no tool calls) for a tokenizer without GLM's special tokens or a text-round
    model (ChatGLM2/6B)."""
    from dist_glm.config import load_config
    from dist_glm.data.template import RoundTextTemplate, build_template, chat_template_mismatch, choose_template

    source = Path(model_args.adapter_name_or_path or model_args.model_name_or_path) / "config.yaml"
    if name == "auto" and source.is_file():
        try:
            name = load_config([str(source)], default_yaml=None).data.template
        except UserError as e:  # another tool's config.yaml, or one this version no longer reads
            log.warning("not reading the training template from %s (%s): using the model type's", source, e)
    try:
        template = build_template(choose_template(name, tokenizer, model_type), tokenizer)
    except UserError as e:
        if name != "auto":
            raise UserError(f"template='{name}': {e}") from None
        log.warning("rendering requests with the tokenizer's chat_template (no tool calls): %s", e)
        return None
    if isinstance(template, RoundTextTemplate):
        # ChatGLM2/6B: plain chats through the tokenizer's chat_template; their own prompt builder where there
        # is none (THUDM's published ChatGLM2 tokenizer has none).
        return None if tokenizer.chat_template else template
    mismatch = chat_template_mismatch(template, tokenizer)
    if mismatch:
        log.warning("requests are rendered with the training template %s; %s", template.name, mismatch)
    return template


def serve(model_args: ModelArgs, args: ServeArgs) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    api_key = os.environ.get(API_KEY_ENV, "") if args.api_key is None else args.api_key
    source = model_args.adapter_name_or_path or model_args.model_name_or_path
    name = args.served_model_name or Path(source).resolve().name
    problems = check_args(model_args, args)
    if problems:
        raise UserError(problems)
    sock = bind(args.host, args.port)
    engine, max_model_len = load_engine(model_args, args)
    if args.tool_call_arguments != "raw" and engine.template_name not in ("glm4", "glm4_0414"):
        raise UserError(
            f"tool_call_arguments={args.tool_call_arguments}: for the glm4 and glm4_0414 templates' tool calls (JSON "
            f"arguments); this model is served with {engine.template_name or 'its chat_template'}; use raw"
        )
    app = build_app(engine, name, max_model_len, api_key, args.tool_call_arguments)
    host, port = sock.getsockname()[:2]
    print(
        f"serve.py: '{name}' on {engine.device} at http://{host}:{port}/v1 (max_model_len {max_model_len}, "
        f"max_batch_size {args.max_batch_size}, {'API key required' if api_key else 'no API key'})",
        flush=True,
    )
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])

"""Chat templates: a conversation -> input ids and labels.

GLM-4 (glm-4-9b-chat, `GlmForCausalLM`), as its own chat_template and THUDM's finetune.py render it:

    [gMASK]<sop><|system|>\\n{system}<|user|>\\n{query}<|assistant|>\\n{reply}<|user|>...
    with tools:    <|system|>\\n你是一个名为 ChatGLM 的人工智能助手。…\\n\\n# 可用工具\\n\\n## {name}\\n\\n{json}…
                   then, if there is one, the user's system prompt as a second <|system|> turn
    a tool call:   <|assistant|>{name}\\n{arguments}<|observation|>\\n{result}<|assistant|>\\n{reply}

GLM-4-0414 (`Glm4ForCausalLM`, template `glm4_0414`) is the same except the tool turn: no identity
sentence, `# 可用工具\\n\\n## {name}…` with `\\n## ` between tools, and a tool call is `{name} \\n{arguments}`.
ChatGLM3 builds every message separately the way its tokenizer's `build_single_message` does (role
token, then `{metadata}\\n`, then the content, each encoded on its own), tools as JSON after the system
text, and a tool call as `<|assistant|>{name}\\n```python\\ntool_call(k=v, ...)\\n```` (its PROMPT.md).
ChatGLM2 and the original ChatGLM-6B are text rounds (see RoundTextTemplate). docs/data.md shows each
rendering; tests/test_templates_official.py checks them against the official references.

The generation prompt ends at `<|assistant|>`: the model itself writes the newline of a reply or the
name of a tool call, so those are trained. By default every assistant turn is trained, plus the token
that ends it (the next turn's role token, or a final `<|user|>`/EOS) so the model learns to stop;
`<|user|>` and `<|observation|>` are EOS ids in GLM's generation config, so generation stops there.
`mask_history` trains the last assistant turn only; `train_on_prompt` trains everything but the fixed
prefix. Special tokens are looked up by name from the tokenizer, never as hard-coded ids.

Truncation keeps the answer: the oldest rounds go first, and if the last round alone is too long the
reply keeps at least half of `cutoff_len` while the prompt is cut from its end (its header is kept).
"""

import ast
import json

from dist_glm.data.encoding import IGNORE_INDEX, Encoded, _encode_text, _fit, _ids  # noqa: F401  (re-exported)
from dist_glm.data.thinking import FORMATS, ThinkingTemplate
from dist_glm.errors import UserError

# The MoE GLMs (GLM-4.5 onward): `auto` must not give them GLM-4's format.
THINKING_ERA_MODEL_TYPES = ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm5_next")
TEMPLATES = (
    "auto", "glm4", "glm4_0414", "glmz1", "glm4_5", "glm4_7", "glm5_1", "glm5_2", "chatglm3", "chatglm2", "chatglm"
)  # fmt: skip
# The identity sentence of glm-4-9b-chat's own chat_template (tokenizer_config.json) before the tool list.
# THUDM's demo code writes "GLM-4" in its place; the checkpoint's template, which users render with, says ChatGLM.
GLM4_TOOL_IDENTITY = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
GLM4_TOOL_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def choose_template(name: str, tokenizer, model_type: str) -> str:
    """`auto`: GLM-4 for `glm` checkpoints, GLM-4-0414 for `glm4` ones. `chatglm` checkpoints (remote
    code) are told apart by their tokenizer: `<|user|>` means ChatGLM3, `sop` ChatGLM2, otherwise the
    original ChatGLM-6B."""
    if name != "auto":
        return name
    if model_type in THINKING_ERA_MODEL_TYPES:
        # GLM-4.6 and GLM-4.7 share model_type glm4_moe: the checkpoint's own chat_template decides; the
        # model type only where there is none (GLM-4.7-Flash and GLM-5 write the compact format).
        matching = [
            f
            for f in ("glm5_2", "glm5_1", "glm4_7", "glm4_5")
            if chat_template_mismatch(build_template(f, tokenizer), tokenizer) is None
        ]
        if getattr(tokenizer, "chat_template", None) and matching:
            return matching[0]
        return "glm4_5" if model_type == "glm4_moe" else "glm4_7"
    known = set(tokenizer.get_vocab()) | set(getattr(tokenizer, "special_tokens", {}))
    # ChatGLM2/3's tokenizers name the start token `sop` (GLM-4's is `<sop>`), also once dist_glm has saved a model
    # trained from them in the native layout (model_type glm).
    # chatglm6b_dist_glm: a ChatGLM-6B dist_glm trained and saved (models/chatglm6b.py).
    if model_type in ("chatglm", "chatglm6b_dist_glm") or (model_type == "glm" and "sop" in known):
        if "<sop>" in known and "sop" not in known and "<|user|>" in known:
            return "glm4"  # glm-4-9b-chat as THUDM published it (model_type chatglm, GLM-4's tokens)
        return "chatglm3" if "<|user|>" in known else "chatglm2" if "sop" in known else "chatglm"
    if model_type == "glm4":
        # GLM-Z1-0414 shares GLM-4-0414's model type; its template prompts with `<|assistant|>\n<think>`.
        z1 = (
            getattr(tokenizer, "chat_template", None)
            and chat_template_mismatch(build_template("glmz1", tokenizer), tokenizer) is None
        )
        return "glmz1" if z1 else "glm4_0414"
    return "glm4"


def _functions(tools: list) -> list:
    """OpenAI-style `{"type": "function", "function": {...}}` entries unwrapped to the function itself."""
    return [t["function"] if isinstance(t, dict) and isinstance(t.get("function"), dict) else t for t in tools]


def python_tool_call(arguments: str) -> str:
    """ChatGLM3's tool call body: `tool_call(k=v, ...)` in a python block, written with `ast.unparse` the
    way its fine-tuning demo's `format_function_call` does. Arguments that are not a JSON object stay as
    they are inside the block."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        args = None
    if isinstance(args, dict):
        keywords = [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in args.items()]
        arguments = ast.unparse(ast.Call(func=ast.Name(id="tool_call"), args=[], keywords=keywords))
    return f"```python\n{arguments}\n```"


class RoleTokenTemplate:
    """GLM-4, GLM-4-0414 and ChatGLM3: every turn starts with a role token."""

    def __init__(self, tokenizer, name: str = "glm4", mask_history: bool = False, train_on_prompt: bool = False):
        self.tok, self.name = tokenizer, name
        self.mask_history, self.train_on_prompt = mask_history, train_on_prompt
        prefix_names = ["[gMASK]", "sop"] if name == "chatglm3" else ["[gMASK]", "<sop>"]
        self.prefix = _ids(tokenizer, prefix_names)
        self.document_prefix = self.prefix  # what the tokenizer's own builder puts before plain text
        roles = ("system", "user", "assistant", "observation")
        self.role_ids = dict(zip(roles, _ids(tokenizer, [f"<|{r}|>" for r in roles]), strict=True))
        # GLM-4 ends a conversation with <|user|> (as THUDM's fine-tuning scripts do); ChatGLM3 with EOS.
        self.end_id = tokenizer.eos_token_id if name == "chatglm3" else self.role_ids["user"]

    def _text(self, s: str) -> list[int]:
        return _encode_text(self.tok, s)

    def expand(self, conv: dict) -> list[dict]:
        return [conv]  # these formats show every turn as it was trained

    def _system_turns(self, system: str, tools: list | None) -> list[str]:
        """The texts of the <|system|> turns: the tool list (its own turn on GLM-4, appended to the
        system text on ChatGLM3), then the user's system prompt."""
        if not tools:
            return [system] if system else []
        functions = _functions(tools)
        if self.name == "chatglm3":
            # build_chat_input: content + "\n" + json, so an empty system prompt keeps the leading newline.
            return [system + "\n" + json.dumps(functions, indent=4, ensure_ascii=False)]
        if self.name == "glm4_0414":
            # As transformers renders GLM-4-0414's template (trim_blocks eats the first "\n" of "\n\n## ").
            blocks = [
                f"## {fn.get('name', '')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n" for fn in functions
            ]
            tool_turn = "# 可用工具\n\n" + "\n".join(b + GLM4_TOOL_SUFFIX for b in blocks)
        else:
            # "\n\n## " as THUDM's own builders write it (the Python apply_chat_template of glm-4-9b-chat's
            # tokenizer, GLM-4's demos); rendered through transformers, trim_blocks would make it "\n## ".
            tool_turn = (
                GLM4_TOOL_IDENTITY
                + "\n\n# 可用工具"
                + "".join(
                    f"\n\n## {fn.get('name', '')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n{GLM4_TOOL_SUFFIX}"
                    for fn in functions
                )
            )
        return [tool_turn] + ([system] if system else [])

    def _head(self, conv: dict) -> list[int]:
        """[gMASK]<sop> and the system turns, if any."""
        ids = list(self.prefix)
        for text in self._system_turns(conv.get("system", ""), conv.get("tools")):
            header, body = self._turn("system", "", text)
            ids += header + body
        return ids

    def _turn(self, role: str, metadata: str, content: str) -> tuple[list[int], list[int]]:
        """(header ids, body ids) of one turn. The header is the role token; the body starts with
        `{metadata}\\n` (a tool name is metadata), which the model writes itself after <|assistant|>.
        GLM-4 encodes `{metadata}\\n{content}` in one piece, as its template renders it as text;
        ChatGLM3 encodes `{metadata}\\n` and the content separately, as its build_single_message does
        (its sentencepiece tokenizer starts every encode with a space piece, so the ids differ)."""
        if self.name == "chatglm3":
            return [self.role_ids[role]], self._text(metadata + "\n") + self._text(content)
        return [self.role_ids[role]], self._text(f"{metadata}\n{content}")

    def _call_text(self, call: dict) -> tuple[str, str]:
        """(metadata, content) of a tool call."""
        if self.name == "chatglm3":
            return call["name"], python_tool_call(call["arguments"])
        if self.name == "glm4_0414":
            return call["name"] + " ", call["arguments"]  # its template writes `{{ meta }} \n{{ content }}`
        return call["name"], call["arguments"]

    def _message(self, m: dict) -> tuple[list[int], list[int]]:
        if m.get("tool_call"):
            return self._turn(m["role"], *self._call_text(m["tool_call"]))
        return self._turn(m["role"], "", m["content"])

    def call_header_ids(self, name: str, conv: dict | None = None) -> list[int]:
        """What follows the assistant header in a call to tool `name`, up to its arguments (a reply
        prefilled with it can only be that call)."""
        metadata, _ = self._call_text({"name": name, "arguments": ""})
        return self._text(metadata + "\n")

    def encode_prompt(self, conv: dict) -> list[int]:
        """Ids for generation: the conversation so far, then the assistant header."""
        ids = self._head(conv)
        for m in conv["messages"]:
            header, body = self._message(m)
            ids += header + body
        return ids + [self.role_ids["assistant"]]

    def encode(self, conv: dict, cutoff_len: int) -> Encoded:
        messages = conv["messages"]
        last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        head = self._head(conv)
        # Rounds: (token ids, labels), each ending with one assistant turn.
        rounds, ids, labels, prev_trained = [], [], [], False
        for i, m in enumerate(messages):
            header, body = self._message(m)
            is_reply = m["role"] == "assistant"
            trained = is_reply and (not self.mask_history or i == last_reply)
            # A role token that follows a trained reply is that reply's terminator, so it is trained.
            header_label = header if (prev_trained or self.train_on_prompt) else [IGNORE_INDEX] * len(header)
            body_label = body if (trained or self.train_on_prompt) else [IGNORE_INDEX] * len(body)
            reply_start = len(ids) + len(header)
            ids, labels = ids + header + body, labels + header_label + body_label
            prev_trained = trained
            if is_reply:
                rounds.append((ids, labels, reply_start))
                ids, labels = [], []
        end_label = self.end_id if (prev_trained or self.train_on_prompt) else IGNORE_INDEX
        last = rounds[-1]
        rounds[-1] = (last[0] + [self.end_id], last[1] + [end_label], last[2])
        head_labels = list(head) if self.train_on_prompt else [IGNORE_INDEX] * len(head)
        head_labels[: len(self.prefix)] = [IGNORE_INDEX] * len(self.prefix)
        # Truncation keeps the <|assistant|> token that ends the prompt.
        input_ids, out_labels, truncated, lost = _fit(head, head_labels, rounds, cutoff_len, header_len=1)
        prompt = self.encode_prompt({**conv, "messages": messages[:last_reply]})
        reply = messages[last_reply]
        reference = reply["content"]
        if reply.get("tool_call"):
            metadata, content = self._call_text(reply["tool_call"])
            reference = f"{metadata}\n{content}"
        return Encoded(input_ids, out_labels, prompt, reference, truncated, lost)


class RoundTextTemplate:
    """ChatGLM2 and ChatGLM-6B text rounds, as their official fine-tuning scripts build them: the prompt
    (earlier rounds and the query) is one text encoded in one piece, the reply another, then EOS; the
    reply plus EOS is trained (the prompt too with train_on_prompt).

    ChatGLM2: `[gMASK]sop[Round 1]\n\n问：q\n\n答：r` (rounds from 1, blank-line separated).
    ChatGLM-6B: `[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q\n答：[gMASK]<sop>r` (rounds from 0; [gMASK]<sop>
    follow the prompt); a single turn is the bare query, `q[gMASK]<sop>r`, as its chat() and its
    P-tuning AdvertiseGen recipe (no history column) build it.
    """

    def __init__(self, tokenizer, version: int, train_on_prompt: bool = False):
        self.tok, self.version, self.train_on_prompt = tokenizer, version, train_on_prompt
        self.name = "chatglm2" if version == 2 else "chatglm"
        self.sep, self.first_round = ("\n\n", 1) if version == 2 else ("\n", 0)
        marks = _ids(tokenizer, ["[gMASK]", "sop" if version == 2 else "<sop>"])
        self.head, self.tail = (marks, []) if version == 2 else ([], marks)
        self.document_prefix = marks

    def expand(self, conv: dict) -> list[dict]:
        return [conv]

    def _text(self, s: str) -> list[int]:
        return _encode_text(self.tok, s)

    def _pairs(self, conv: dict) -> list[tuple[str, str]]:
        if any(m["role"] == "observation" or m.get("tool_call") for m in conv["messages"]):
            # Rounds of question and answer have no place for a tool's call or result: pairing what is
            # left by position would train a user's turn as a reply.
            raise UserError(
                f"{conv.get('where', 'a conversation')}: template {self.name} has no tool calls or tool results; "
                "use template chatglm3, glm4 or glm4_0414 for tool data, or leave these rows out"
            )
        msgs = [m for m in conv["messages"] if m["role"] in ("user", "assistant")]
        pairs = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 1, 2)]
        if conv.get("system") and pairs:
            pairs[0] = (conv["system"] + "\n" + pairs[0][0], pairs[0][1])
        return pairs

    def _round(self, i: int, query: str) -> str:
        return f"[Round {i + self.first_round}]{self.sep}问：{query}{self.sep}答："

    def _prompt_ids(self, pairs: list[tuple[str, str]], first: int = 0) -> tuple[list[int], int]:
        """(prompt ids from round `first` on, the length of its assistant header)."""
        *history, (query, _) = pairs
        if self.version == 1 and not history:
            return self.head + self._text(query) + self.tail, len(self.tail)
        text = "".join(self._round(i, q) + r + self.sep for i, (q, r) in enumerate(history) if i >= first)
        ids = self.head + self._text(text + self._round(len(history), query)) + self.tail
        return ids, len(self._text(f"{self.sep}答：")) + len(self.tail)

    def encode_prompt(self, conv: dict) -> list[int]:
        pairs = self._pairs({**conv, "messages": conv["messages"] + [{"role": "assistant", "content": ""}]})
        return self._prompt_ids(pairs)[0]

    def encode(self, conv: dict, cutoff_len: int) -> Encoded:
        pairs = self._pairs(conv)
        reply = self._text(pairs[-1][1]) + [self.tok.eos_token_id]
        # The oldest rounds go first; the rest of the prompt is re-encoded as one text each time.
        first = 0
        prompt, header_len = self._prompt_ids(pairs)
        while first < len(pairs) - 1 and len(prompt) + len(reply) > cutoff_len:
            first += 1
            prompt, header_len = self._prompt_ids(pairs, first)
        if self.train_on_prompt:
            prompt_labels = [IGNORE_INDEX] * len(self.head) + prompt[len(self.head) :]
        else:
            prompt_labels = [IGNORE_INDEX] * len(prompt)
        rounds = [(prompt + reply, prompt_labels + reply, len(prompt))]
        ids, labels, truncated, lost = _fit([], [], rounds, cutoff_len, header_len)
        generation_prompt = self.encode_prompt({**conv, "messages": conv["messages"][:-1]})
        lost = (("rounds",) if first > 0 else ()) + lost
        return Encoded(ids, labels, generation_prompt, pairs[-1][1], truncated or first > 0, lost)


def build_template(
    name: str, tokenizer, mask_history: bool = False, train_on_prompt: bool = False, reasoning_history: str = "expand"
):
    if name in FORMATS:
        return ThinkingTemplate(tokenizer, name, mask_history, train_on_prompt, reasoning_history)
    if name in ("chatglm2", "chatglm"):
        return RoundTextTemplate(tokenizer, 2 if name == "chatglm2" else 1, train_on_prompt)
    return RoleTokenTemplate(tokenizer, name, mask_history, train_on_prompt)


# Probe conversations for the start-up check: no tools, since GLM-4's tool block deliberately differs
# from the transformers rendering of glm-4-9b-chat's template (see RoleTokenTemplate._system_turns).
PROBES = (
    [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}],
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "讲个笑话"},
    ],
)
# GLM-4.7 and GLM-5.1 differ only in how they list tools: the thinking formats are also probed with one.
TOOL_PROBE = [{"role": "user", "content": "北京天气"}]
PROBE_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "查天气",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
]  # fmt: skip


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _around(tokenizer, ids: list[int], i: int) -> str:
    """The text just before and after token i, split by ` | `."""
    return f"{tokenizer.decode(ids[max(i - 8, 0) : i])!r} | {tokenizer.decode(ids[i : i + 8])!r}"


def chat_template_mismatch(template, tokenizer) -> str | None:
    """When the tokenizer ships a chat_template, check that our encoding of probe prompts equals the
    tokenizer's own rendering, done by `apply_chat_template` exactly as transformers does it (its
    trim_blocks / lstrip_blocks settings included). A difference means the checkpoint expects another
    format; the message names the first differing token and shows both renderings around it."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probes = [(p, None) for p in PROBES]
    if isinstance(template, ThinkingTemplate) and template.takes_tools:
        probes.append((TOOL_PROBE, PROBE_TOOLS))
    for probe, tools in probes:
        try:
            theirs = list(
                tokenizer.apply_chat_template(
                    probe, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        except Exception as e:  # a remote-code tokenizer's template may not render plain messages at all
            return f"the tokenizer's chat_template could not render a probe conversation ({e})"
        system = probe[0]["content"] if probe[0]["role"] == "system" else ""
        messages = [m for m in probe if m["role"] != "system"]
        ours = template.encode_prompt({"system": system, "tools": tools, "messages": messages})
        if ours == theirs:
            continue
        i = _first_difference(ours, theirs)
        return (
            f"the tokenizer's own chat_template renders a probe prompt as {tokenizer.decode(theirs)!r} but the "
            f"chosen template gives {tokenizer.decode(ours)!r}; they first differ at token {i}: the tokenizer's "
            f"{_around(tokenizer, theirs, i)}, ours {_around(tokenizer, ours, i)}; check the `template` setting"
        )
    return None

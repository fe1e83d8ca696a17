"""ChatGLM-6B, THUDM's first ChatGLM (`model_type: chatglm` with `position_encoding_2d`), written here so that a
checkpoint directory as THUDM published it (config.json, pytorch_model-*.bin under THUDM's weight names,
ice_text.model) loads with transformers without running the checkpoint's own Python. The state dict keeps
THUDM's names, so `ChatGLM6BForCausalLM.from_pretrained(path, config=published_config(path))` reads the
published files as they are, and `save_pretrained` writes them under the same names.

The architecture, as THUDM's modeling_chatglm.py computes it (tests/data/chatglm/chatglm.json holds the logits
that code gave on tiny weights, SOURCES.md says how):
- GLM's blank filling used as a chat model: the prompt ends with `[gMASK] <sop>`; the tokens before `<sop>` (the
  context) attend in both directions, `<sop>` and everything after it attend causally.
- 2-D rotary positions. Each token has a position (its index, except that every token from `<sop>` on is pinned
  to the index of `[gMASK]`, or of `[MASK]` when there is no `[gMASK]`) and a block position (0 in the context,
  then 1, 2, 3, ... from `<sop>` on). The first half of every head is rotated by the position, the second half by
  the block position, each rotate-half style, with base-10000 inverse frequencies rounded to fp16 (THUDM keeps
  them in fp16; the rounding moves logits by ~4e-7 in fp32, so it is kept).
- Pre-LayerNorm blocks whose residual carries the NORMALISED input, scaled: h = LN(x) * alpha + attention(LN(x)),
  out = LN(h) * alpha + mlp(LN(h)), alpha = sqrt(2 * 28) at any depth (see RESIDUAL_SCALE).
- A fused query/key/value matrix laid out per head ([heads, 3, head_dim]); biases on every linear layer; a GeLU
  (tanh approximation) MLP of `inner_hidden_size`, not gated; an untied LM head over `vocab_size` rows.
- Attention is softmax(q.k / sqrt(head_dim)) over the visible keys. THUDM divides q by sqrt(head_dim) * (layer+1)
  and multiplies the fp32 scores back (an fp16 overflow guard) and writes -10000 into hidden scores: the same
  numbers on every row that sees a key. A row that sees none (a left pad's, in THUDM's mask) averages all values
  there; here a pad always sees itself. Pad positions' outputs are never used.

Positions and the prefix mask are computed from the ids when not given (`chatglm6b_positions`): per sample
after its left padding, or per packed sample where dist_glm's 1-D `position_ids` restart at 0. During
`generate` they are recomputed from the whole sequence at every step, so a new token gets [gMASK index,
next block position], as in THUDM's generation.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

ROPE_BASE = 10000
# The residual scale sqrt(2 * 28): THUDM's GLMBlock computes sqrt(2 * num_layers) from its own `num_layers`
# argument, which ChatGLMModel never passes, so it is 28 (ChatGLM-6B's depth) whatever config.json says.
RESIDUAL_SCALE = math.sqrt(2 * 28)
# Keys of THUDM's config.json that describe its Python, not the model; dropped by `published_config`.
PUBLISHED_ONLY_KEYS = ("_name_or_path", "architectures", "auto_map", "model_type", "transformers_version")


class ChatGLM6BConfig(PreTrainedConfig):
    """THUDM's ChatGLM-6B config.json keys, defaults as published (THUDM/chatglm-6b)."""

    model_type = "chatglm6b_dist_glm"  # not "chatglm": transformers' registry and THUDM's own code use that name
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004  # <sop>: the context ends before it
    eos_token_id: int | list[int] | None = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]: what the generated tokens' position is pinned to
    pad_token_id: int | None = 3
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        problems = []
        if not self.position_encoding_2d:
            problems.append("position_encoding_2d: false (1-D positions) is not ChatGLM-6B's architecture")
        if kwargs.get("quantization_bit"):
            problems.append(f"quantization_bit: {kwargs['quantization_bit']} (THUDM's int4/int8 weights)")
        if kwargs.get("pre_seq_len") is not None:
            problems.append(f"pre_seq_len: {kwargs['pre_seq_len']} (a THUDM P-tuning v2 checkpoint)")
        if problems:
            raise ValueError(
                "ChatGLM-6B config not supported: " + "; ".join(problems) + ". Use the full-precision checkpoint "
                "as THUDM published it (THUDM/chatglm-6b)"
            )
        super().__post_init__(**kwargs)


def register_auto_classes() -> None:
    """Lets AutoConfig and AutoModelForCausalLM load what ChatGLM6BForCausalLM saved (model_type
    chatglm6b_dist_glm, THUDM's weight names); a published directory (model_type chatglm) goes through
    `published_config` instead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(ChatGLM6BConfig.model_type, ChatGLM6BConfig, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM6BConfig, ChatGLM6BForCausalLM, exist_ok=True)


def published_config(path) -> ChatGLM6BConfig:
    """The config of a ChatGLM-6B directory as THUDM published it (its config.json, minus the keys that point
    at THUDM's Python)."""
    import json
    from pathlib import Path

    values = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return ChatGLM6BConfig(**{k: v for k, v in values.items() if k not in PUBLISHED_ONLY_KEYS})


def chatglm6b_positions(input_ids, config, attention_mask=None, sample_positions=None):
    """THUDM's 2-D positions (B x 2 x T: position, block position), whether each token is context (seen in both
    directions by its sample) and each token's sample number, from the ids.

    A row holds one sample after its left padding (`attention_mask` 0 on pads; longer masks, e.g. with a prefix's
    columns first, are read from the right), or several packed samples, where `sample_positions` (dist_glm's
    packed `position_ids`) restart at 0 for each. A sample without `<sop>` is plain causal text: positions
    0, 1, 2, ..., block positions 0 (THUDM's model refuses such input; its tokenizer would make it all context,
    which would let training see the future)."""
    length = input_ids.shape[1]
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -length:] > 0
    if sample_positions is None:
        local = (real.long().cumsum(-1) - 1).clamp(min=0)  # counted from the first real token
        sample = torch.zeros_like(local)
    else:
        local = sample_positions.long()
        sample = (local == 0).long().cumsum(-1)
    none = torch.iinfo(torch.long).max

    def first(token_id):  # local index of the sample's first `token_id`, `none` if it has none
        hits = torch.where((input_ids == token_id) & real, local, none)
        table = torch.full((input_ids.shape[0], length + 1), none, dtype=torch.long, device=input_ids.device)
        return table.scatter_reduce(1, sample, hits, reduce="amin").gather(1, sample)

    sop, gmask, mask = first(config.bos_token_id), first(config.gmask_token_id), first(config.mask_token_id)
    pin = torch.where(gmask != none, gmask, mask)
    generated = local >= sop  # <sop> and after; never true without a <sop>
    position = torch.where(generated & (pin != none), pin, local)
    block = torch.where(generated, local - sop + 1, 0)
    context = ~generated & (sop != none)
    return torch.stack([position, block], dim=1), context, sample


def visible_keys(context, sample, real, past_real):
    """B x 1 x T x (past + T), True where a query may attend: keys already in the cache (a prefix, or the
    generation so far) when real; within the chunk, keys of the same sample that are real and either earlier
    (causal) or context (both directions). Every query sees itself, so no row is empty."""
    length = context.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=context.device).tril()
    chunk = (sample[:, :, None] == sample[:, None, :]) & (causal | context[:, None, :]) & real[:, None, :]
    chunk |= torch.eye(length, dtype=torch.bool, device=context.device)
    past = past_real[:, None, :].expand(-1, length, -1)
    return torch.cat([past, chunk], dim=-1)[:, None]


def _rotary(positions, head_dim: int, dtype):
    """cos and sin for the position and the block position: 4 tensors of B x T x 1 x head_dim/2. Computed in
    fp32 from the fp16-rounded inverse frequencies, then cast (THUDM computes them in the weights' dtype)."""
    dim = head_dim // 2
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions[..., None].float() * inv_freq.half().float()  # B x 2 x T x dim/2
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype)[..., None, :], angles.sin().to(dtype)[..., None, :]
    return cos[:, 0], sin[:, 0], cos[:, 1], sin[:, 1]


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class ChatGLM6BAttention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.heads = layer_idx, config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden, rotary, visible, cache=None):
        batch, length, _ = hidden.shape
        # THUDM's fused layout: per head, its query, key and value blocks side by side.
        q, k, v = self.query_key_value(hidden).view(batch, length, self.heads, 3 * self.head_dim).chunk(3, dim=-1)
        cos, sin, block_cos, block_sin = rotary
        half = self.head_dim // 2
        q = torch.cat([_rotate(q[..., :half], cos, sin), _rotate(q[..., half:], block_cos, block_sin)], dim=-1)
        k = torch.cat([_rotate(k[..., :half], cos, sin), _rotate(k[..., half:], block_cos, block_sin)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class ChatGLM6BMLP(nn.Module):
    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class ChatGLM6BBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLM6BAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLM6BMLP(config)
        self.alpha = RESIDUAL_SCALE

    def forward(self, hidden, rotary, visible, cache=None):
        normed = self.input_layernorm(hidden)
        hidden = normed * self.alpha + self.attention(normed, rotary, visible, cache)
        normed = self.post_attention_layernorm(hidden)
        return normed * self.alpha + self.mlp(normed)


class ChatGLM6BPreTrainedModel(PreTrainedModel):
    config_class = ChatGLM6BConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLM6BBlock"]
    _supports_sdpa = True
    # THUDM saved each layer's rotary inverse frequencies with the weights; they are recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class ChatGLM6BModel(ChatGLM6BPreTrainedModel):
    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ChatGLM6BBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=False,
    ) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError(
                "ChatGLM-6B derives its attention mask (and positions) from the token ids ([gMASK], <sop>): pass "
                "input_ids (inputs_embeds may replace their embeddings)"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}: pass the 2-D padding mask (1 = token, "
                "0 = pad), as ChatGLM-6B's tokenizer here returns it; the model builds its prefix mask from the ids"
            )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens, but the cache holds {past} and input_ids "
                f"{length}: the mask must cover both (a prefix's columns included, e.g. P-tuning's)"
            )
        real = attention_mask > 0
        if position_ids is not None and position_ids.dim() == 3:  # THUDM's own [position, block position]
            positions = position_ids
            _, context, sample = chatglm6b_positions(input_ids, self.config, attention_mask)
        else:  # none, or dist_glm's packed per-sample positions (B x T)
            positions, context, sample = chatglm6b_positions(input_ids, self.config, attention_mask, position_ids)
        hidden = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        visible = visible_keys(context, sample, real[:, past:], real[:, :past])
        rotary = _rotary(positions, self.config.hidden_size // self.config.num_attention_heads, hidden.dtype)
        states = []
        for layer in self.layers:
            states += [hidden] if output_hidden_states else []
            hidden = layer(hidden, rotary, visible, cache=cache)
        hidden = self.final_layernorm(hidden)
        states += [hidden] if output_hidden_states else []
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=tuple(states) or None)


class ChatGLM6BForCausalLM(ChatGLM6BPreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        self.transformer = ChatGLM6BModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=False,
        output_attentions=False,
        return_dict=None,  # accepted for transformers' callers; the result is always a CausalLMOutputWithPast
        past_key_values=None,  # the name of `cache` before transformers 5
    ) -> CausalLMOutputWithPast:
        """`position_ids`: none (computed from the ids), dist_glm's packed per-sample positions (B x T, restarting
        at 0 for each sample), or THUDM's 2-D positions (B x 2 x T). `labels`: next-token targets, -100 ignored;
        the loss is their mean in fp32."""
        if output_attentions:
            raise ValueError("output_attentions: ChatGLM-6B here attends with SDPA, which returns no weights")
        out = self.transformer(
            input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
            inputs_embeds, use_cache, output_hidden_states,
        )  # fmt: skip
        # Batch-first, called as lm_head(hidden): dist_glm's losses run the head on labelled positions only
        # by replacing this call (objectives/cross_entropy.py).
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # transformers would count 1-D positions and add 1 to both rows at each step; they are computed from
        # the whole sequence in `prepare_inputs_for_generation` instead.
        return None

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "position_ids given to generate: ChatGLM-6B's generation computes its 2-D positions from the ids "
                "at every step (a new token gets [gMASK index, next block position]); leave them out"
            )
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        positions, _, _ = chatglm6b_positions(input_ids, self.config, kwargs.get("attention_mask"))
        inputs["position_ids"] = positions[..., -inputs["input_ids"].shape[1] :]
        return inputs

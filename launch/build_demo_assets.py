"""Regenerate the shipped demo assets: tiny GLM configs, tokenizer and AdvertiseGen-shaped data.

The outputs are committed, so nobody needs to run this; it exists so the assets are reproducible
and reviewable. Usage: python launch/build_demo_assets.py

`--moe` writes the tiny Mixture-of-Experts GLMs (assets/tiny-glm4-moe, tiny-glm4-moe-lite, tiny-glm-moe-dsa):
each family's real structure (shared expert, sigmoid router with its correction bias, dense first
layers, MLA, the DSA indexer, the MTP layer count) at hidden size 64 with 8 experts top-2, and the tiny
BPE vocabulary with the special tokens of GLM-4.5 and later (thinking, XML tool calls) appended.

`--chatglm` writes the published ChatGLM layouts at a tiny size (assets/tiny-chatglm2, tiny-chatglm3,
tiny-glm-4-9b-chat): THUDM's config.json and tokenizer_config.json with the dimensions shrunk (the `auto_map`
to the checkpoint's own Python kept, that Python absent: dist_glm never runs it), and a tokenizer.model
in the published format: sentencepiece with ChatGLM2/3's settings trained on the demo data, or the tiny
BPE vocabulary written as tiktoken ranks for glm-4-9b-chat. The published values are in SOURCES.md.

`--real-vocab DIR` writes a GLM-4-shaped checkpoint directory at GLM-4's real vocabulary instead
(assets/glm4-real-vocab: GlmForCausalLM, vocab 151,552, the special tokens at their real ids
151329-151342). Only its config is committed; its 3 MB tokenizer.json is generated (the tests do it
in a temporary directory). `--real-vocab-moe DIR` writes the same at GLM-4.5's shape (glm4_moe: a dense
first layer, then 16 routed experts top-4 and a shared expert), the benchmark's MoE workload.
"""

import itertools
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# GLM-4's special tokens, in GLM-4's own order; the tiny vocab appends them after the BPE merges.
GLM4_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
]  # fmt: skip

# GLM-4 chat template (as in THUDM/glm-4-9b-chat-hf, without the tool block, which the data issue adds).
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TYPES = ["连衣裙", "上衣", "裤子", "外套", "衬衫"]
COLORS = ["红色", "白色", "黑色", "蓝色", "粉色", "绿色"]
STYLES = {
    "复古": "尽显优雅韵味",
    "休闲": "穿着舒适自在",
    "简约": "百搭又大方",
    "甜美": "俏皮又可爱",
    "通勤": "干练又得体",
}
PATTERNS = ["碎花", "条纹", "格子", "纯色"]
FABRICS = ["棉质", "雪纺", "牛仔", "针织"]


def build_data(out_dir: Path) -> None:
    """Every attribute combination once; the summary is a fixed function of the attributes, so a tiny
    model can learn it and the held-out split (unseen combinations) measures real generalisation."""
    rows = []
    for kind, color, style, pattern, fabric in itertools.product(TYPES, COLORS, STYLES, PATTERNS, FABRICS):
        content = f"类型#{kind}*颜色#{color}*风格#{style}*图案#{pattern}*材质#{fabric}"
        summary = f"这款{color}{kind}采用{fabric}面料，{pattern}图案点缀，{style}风格{STYLES[style]}。"
        rows.append({"content": content, "summary": summary})
    random.Random(0).shuffle(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"dev.jsonl": rows[:64], "train.jsonl": rows[64:]}
    for name, split in splits.items():
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for row in split:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# The tool-calling demo's one tool, in OpenAI's `tools` shape (what a client sends the server). Its schema
# is minimal on purpose: the tiny tokenizer spells English JSON keys byte by byte, and every training row
# carries the tool block.
STOCK_TOOL = {"type": "function", "function": {"name": "check_stock", "parameters": {"type": "object"}}}


def build_tool_data(out_dir: Path) -> None:
    """OpenAI-messages rows for the tool-calling demo (data/tool_demo): a stock question is answered by
    calling check_stock with the colour and type it names, then by a reply that reads the tool's result;
    a question about its looks gets a direct answer although the tool is on offer. The model has to decide,
    copy arguments into JSON and read a number back, all learnable by the tiny GLM in a few hundred steps.
    The rows are not part of the tokenizer's corpus, so adding them changed no shipped token."""
    rng = random.Random(1)
    rows = []
    for kind, color in itertools.product(TYPES, COLORS):
        for count in rng.sample(range(0, 40), 6):
            call = {"name": "check_stock", "arguments": json.dumps({"颜色": color, "类型": kind}, ensure_ascii=False)}
            reply = f"{color}{kind}还有{count}件。" if count else f"抱歉，{color}{kind}暂时缺货。"
            messages = [
                {"role": "user", "content": f"{color}{kind}有货吗？"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": json.dumps({"库存": count}, ensure_ascii=False)},
                {"role": "assistant", "content": reply},
            ]
            rows.append({"messages": messages, "tools": [STOCK_TOOL]})
        for question in ("好看吗？", "怎么样？", "值得买吗？"):
            messages = [
                {"role": "user", "content": f"{color}{kind}{question}"},
                {"role": "assistant", "content": f"这款{color}{kind}百搭又大方。"},
            ]
            rows.append({"messages": messages, "tools": [STOCK_TOOL]})
    random.Random(0).shuffle(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def demo_corpus(data_dir: Path) -> list[str]:
    corpus = []
    for name in ("train.jsonl", "dev.jsonl"):
        for line in open(data_dir / name, encoding="utf-8"):
            row = json.loads(line)
            corpus += [row["content"], row["summary"]]
    # Some English and punctuation so that user text outside the demo domain still tokenizes sensibly.
    return corpus + ["The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:()[]{}<>\"'-_/\\@#$%^&*+=~`|"] * 20


def build_tokenizer(out_dir: Path, corpus: list[str]) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(GLM4_SPECIAL_TOKENS)
    return len(save_glm4_tokenizer(out_dir, tokenizer_object=tok))


def save_glm4_tokenizer(out_dir: Path, **source):
    """A fast tokenizer (from `tokenizer_object=` or `tokenizer_file=`) with GLM-4's special tokens and chat
    template, saved to out_dir."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        **source,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=GLM4_SPECIAL_TOKENS[1:],
        chat_template=GLM4_CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_model_configs(vocab_size: int, tok_dir: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig, Glm4Config, GlmConfig

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    eos = list(ids.values())
    shape = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        pad_token_id=ids["<|endoftext|>"], eos_token_id=eos, tie_word_embeddings=False,
    )  # fmt: skip
    for name, cls in (("tiny-glm4", GlmConfig), ("tiny-glm4-0414", Glm4Config)):
        out = ROOT / "assets" / name
        cls(**shape).save_pretrained(out)
        GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"], do_sample=False).save_pretrained(out)
        tok.save_pretrained(out)
    # The distillation demo's student: the same tokenizer, a quarter of the width, half the depth.
    student = dict(shape, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1)  # fmt: skip
    out = ROOT / "assets" / "tiny-glm4-student"
    GlmConfig(**student).save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"], do_sample=False).save_pretrained(out)
    tok.save_pretrained(out)


GLM4_REAL_VOCAB_SIZE = 151552  # the embedding / LM-head rows of glm-4-9b-chat and GLM-4-9B-0414
GLM4_FIRST_SPECIAL_ID = 151329  # <|endoftext|> in GLM-4's tokenizer; the others follow in GLM4_SPECIAL_TOKENS order


def build_real_vocab_tokenizer(out_dir: Path, tiny_dir: Path = ROOT / "assets" / "tiny-glm4") -> None:
    """The tiny BPE vocabulary, padded with never-produced filler pieces up to id 151328, then GLM-4's
    special tokens at their real ids, so every special id is >= 151329 as in the real tokenizer."""

    spec = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    # Fillers have no merges leading to them, so encoding never produces them.
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), GLM4_FIRST_SPECIAL_ID)})
    template = spec["added_tokens"][0]
    spec["added_tokens"] = [
        {**template, "id": GLM4_FIRST_SPECIAL_ID + k, "content": t} for k, t in enumerate(GLM4_SPECIAL_TOKENS)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    save_glm4_tokenizer(out_dir, tokenizer_file=str(out_dir / "tokenizer.json"))


def build_real_vocab_config(out_dir: Path) -> None:
    """GlmForCausalLM at the real vocabulary with a small body: the LM head and cross-entropy over
    151,552 logits dominate memory there, as in the real model."""
    from transformers import GenerationConfig, GlmConfig

    eos = [
        GLM4_FIRST_SPECIAL_ID + GLM4_SPECIAL_TOKENS.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    shape = dict(
        vocab_size=GLM4_REAL_VOCAB_SIZE, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
        pad_token_id=eos[0], eos_token_id=eos, tie_word_embeddings=False,
    )  # fmt: skip
    GlmConfig(**shape).save_pretrained(out_dir)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[0], do_sample=False).save_pretrained(out_dir)


def build_real_vocab_moe_config(out_dir: Path) -> None:
    """A GLM-4.5-shaped Mixture of Experts (glm4_moe) at the real vocabulary with a small body: a dense first
    layer, then an MoE layer of 16 routed experts, top-4, and a shared expert (the benchmark's MoE workload)."""
    from transformers import GenerationConfig, Glm4MoeConfig

    eos = [
        GLM4_FIRST_SPECIAL_ID + GLM4_SPECIAL_TOKENS.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    shape = dict(
        vocab_size=GLM4_REAL_VOCAB_SIZE, hidden_size=512, intermediate_size=1376, moe_intermediate_size=256,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, max_position_embeddings=8192,
        pad_token_id=eos[0], eos_token_id=eos, tie_word_embeddings=False,
    )  # fmt: skip
    Glm4MoeConfig(**shape).save_pretrained(out_dir)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[0], do_sample=False).save_pretrained(out_dir)


# The added tokens of GLM-4.5 and later, in their tokenizer's order after GLM-4's 14 (SOURCES.md); the first 18
# of the 36 are special (skipped when decoding), the thinking and tool-call markup are not.
GLM45_EXTRA_TOKENS = [
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
]  # fmt: skip
GLM45_SPECIAL_COUNT = 18


def build_moe_tokenizer(out_dir: Path, tiny_dir: Path = ROOT / "assets" / "tiny-glm4") -> int:
    """The tiny vocabulary with GLM-4.5's added tokens after GLM-4's (ids 714 on)."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_dir / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    specials = GLM4_SPECIAL_TOKENS + GLM45_EXTRA_TOKENS
    fast.add_tokens([AddedToken(t, special=i < GLM45_SPECIAL_COUNT, normalized=False) for i, t in enumerate(specials)])
    fast.add_special_tokens({"additional_special_tokens": specials[1:GLM45_SPECIAL_COUNT]})
    fast.save_pretrained(out_dir)
    return len(fast)


def build_moe_configs() -> None:
    """Tiny glm4_moe (GLM-4.5/4.6/4.7), glm4_moe_lite (GLM-4.7-Flash) and glm_moe_dsa (GLM-5.x)."""
    from transformers import GenerationConfig, Glm4MoeConfig, Glm4MoeLiteConfig, GlmMoeDsaConfig

    first = ROOT / "assets" / "tiny-glm4-moe"
    vocab_size = build_moe_tokenizer(first)
    tok_files = {f.name: f.read_bytes() for f in first.iterdir()}
    ids = {
        t: (GLM4_SPECIAL_TOKENS + GLM45_EXTRA_TOKENS).index(t) + 700
        for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    }
    eos = list(ids.values())
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
        max_position_embeddings=512, pad_token_id=ids["<|endoftext|>"], eos_token_id=eos, tie_word_embeddings=False,
    )  # fmt: skip
    mla = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    configs = {
        # GLM-4.5: GQA with qk-norm and partial RoPE, the first layer dense, one MTP layer kept in the checkpoint.
        "tiny-glm4-moe": Glm4MoeConfig(
            **common, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, first_k_dense_replace=1,
            use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        ),
        # GLM-4.7-Flash: multi-latent attention, the first layer dense.
        "tiny-glm4-moe-lite": Glm4MoeLiteConfig(
            **common, **mla, num_hidden_layers=3, num_key_value_heads=4, routed_scaling_factor=1.8,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        # GLM-5: MLA plus DeepSeek sparse attention's indexer, the first layer dense.
        "tiny-glm-moe-dsa": GlmMoeDsaConfig(
            **common, **mla, num_hidden_layers=3, num_key_value_heads=4, routed_scaling_factor=2.5, head_dim=8,
            index_topk=16, index_head_dim=16, index_n_heads=2, first_k_dense_replace=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    }  # fmt: skip
    for name, config in configs.items():
        out = ROOT / "assets" / name
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"], do_sample=False).save_pretrained(out)
        for fname, data in tok_files.items():
            if fname.startswith("tokenizer") or fname == "special_tokens_map.json":
                (out / fname).write_bytes(data)


# The ChatGLM configs as THUDM published them (SOURCES.md), minus the dimensions the tiny assets shrink.
CHATGLM_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
CHATGLM_COMMON = {
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "multi_query_attention": True, "original_rope": True, "post_layer_norm": True, "rmsnorm": True,
    "use_cache": True, "tie_word_embeddings": False,
}  # fmt: skip
CHATGLM_TINY = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "multi_query_group_num": 2,
    "ffn_hidden_size": 96,
}  # fmt: skip


def build_chatglm_sentencepiece(out_file: Path, corpus: list[str]) -> None:
    """ChatGLM2/3's tokenizer.model settings (SOURCES.md): BPE, <unk> <s> </s> at 0-2, the 256 byte pieces
    next, digits split, a dummy prefix, whitespace kept; 900 pieces here instead of 64789."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=900,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )  # fmt: skip
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())


def build_chatglm_assets(corpus: list[str]) -> None:
    for name, version, seq_length in (("chatglm2", "4.27.1", 32768), ("chatglm3", "4.30.2", 8192)):
        out = ROOT / "assets" / f"tiny-{name}"
        build_chatglm_sentencepiece(out / "tokenizer.model", corpus)
        config = {
            "_name_or_path": f"THUDM/{name}-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "auto_map": CHATGLM_AUTO_MAP, **CHATGLM_COMMON, **CHATGLM_TINY, "layernorm_epsilon": 1e-05,
            "padded_vocab_size": 1024, "seq_length": seq_length, "torch_dtype": "float16",
            "transformers_version": version, "eos_token_id": 2, "pad_token_id": 0,
        }  # fmt: skip
        tokenizer_config = {
            "name_or_path": f"THUDM/{name}-6b", "remove_space": False, "do_lower_case": False,
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        }  # fmt: skip
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    build_glm4_chat_layout(ROOT / "assets" / "tiny-glm-4-9b-chat")


def build_glm4_chat_layout(out: Path, tiny_dir: Path = ROOT / "assets" / "tiny-glm4") -> None:
    """glm-4-9b-chat as published: tokenizer.model holds tiktoken ranks (`base64(bytes) rank` lines); the
    tokenizer numbers its 14 special tokens after them. The tiny BPE's pieces are the ranks here (their ids
    follow merge order, which is what a rank means to tiktoken)."""
    import base64

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    lines = [base64.b64encode(bytes(byte_of[c] for c in piece)).decode() + f" {rank}" for piece, rank in ranks]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    first = len(ranks)
    eos = [first + GLM4_SPECIAL_TOKENS.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = {
        "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": CHATGLM_AUTO_MAP, **CHATGLM_COMMON, **CHATGLM_TINY, "num_hidden_layers": CHATGLM_TINY["num_layers"],
        "layernorm_epsilon": 1.5625e-07, "rope_ratio": 500, "padded_vocab_size": 768, "seq_length": 131072,
        "torch_dtype": "bfloat16", "transformers_version": "4.30.2", "eos_token_id": eos, "pad_token_id": eos[0],
    }  # fmt: skip
    added = {
        str(first + k): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": True}
        for k, t in enumerate(GLM4_SPECIAL_TOKENS)
    }  # fmt: skip
    tokenizer_config = {
        "added_tokens_decoder": added, "additional_special_tokens": GLM4_SPECIAL_TOKENS[1:],
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "chat_template": GLM4_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "do_lower_case": False,
        "eos_token": "<|endoftext|>", "model_max_length": 128000, "pad_token": "<|endoftext|>",
        "padding_side": "left", "remove_space": False, "tokenizer_class": "ChatGLM4Tokenizer",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    generation = {"eos_token_id": eos, "pad_token_id": eos[0], "do_sample": True, "temperature": 0.8, "top_p": 0.8}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def build_chatglm6b_assets(corpus: list[str]) -> None:
    """ChatGLM-6B (the first ChatGLM) as THUDM published it, at a tiny size (assets/tiny-chatglm-6b): its
    config.json and tokenizer_config.json with the dimensions shrunk, and an ice_text.model in the published
    format (tests/data/chatglm/SOURCES.md): Unigram, nmt_nfkc, extra whitespace removed, a dummy prefix, digits
    split, `<unk> <s> </s> <pad> <n>` at 0-4; after the trained pieces, as in the published file, the control
    pieces `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`, the user-defined `<|tab|>` and
    `<|blank_2|>`..`<|blank_80|>`, then the 256 byte pieces, with byte fallback on. 200 trained pieces here
    instead of 130000, so `[MASK]` is 200 and the file holds 544 pieces (the published one 130344). Every
    printable ASCII character has a piece, as in the published file (the demo text lacks most capitals)."""
    import io
    import string

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = ROOT / "assets" / "tiny-chatglm-6b"
    out.mkdir(parents=True, exist_ok=True)
    trained = 200
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="unigram", vocab_size=trained,
        character_coverage=0.9999, split_digits=True, user_defined_symbols=["<n>"], pad_id=3, byte_fallback=False,
        required_chars=string.ascii_letters + string.digits + string.punctuation,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=True,
        max_sentencepiece_length=16, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )  # fmt: skip
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    # Byte pieces are appended rather than trained in (training would put them at ids 5-260), as in the published file.
    control = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    user_defined = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
    for pieces, kind in ((control, pb.ModelProto.SentencePiece.CONTROL),
                         (user_defined, pb.ModelProto.SentencePiece.USER_DEFINED),
                         ([f"<0x{b:02X}>" for b in range(256)], pb.ModelProto.SentencePiece.BYTE)):  # fmt: skip
        for piece in pieces:
            proto.pieces.add(piece=piece, score=0.0, type=kind)
    proto.trainer_spec.byte_fallback = True
    (out / "ice_text.model").write_bytes(proto.SerializeToString())
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    config = {
        "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": ids["<sop>"], "eos_token_id": ids["<eop>"], "mask_token_id": ids["[MASK]"],
        "gmask_token_id": ids["[gMASK]"], "pad_token_id": ids["<pad>"], "hidden_size": 64, "inner_hidden_size": 128,
        "layernorm_epsilon": 1e-05, "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 4,
        "num_layers": 2, "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
        "use_cache": True,
        # The published embedding has 184 rows past the tokenizer's 130344 pieces; the tiny one 32.
        "vocab_size": len(proto.pieces) + 32,
    }  # fmt: skip
    tokenizer_config = {
        "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def build_pref_data(data_dir: Path, n: int = 512) -> None:
    """Preference pairs for the DPO demo (data/advertisegen_demo/pairs.jsonl), in TRL's prompt/chosen/rejected
    shape: the first `n` training rows' reference answer against the same answer with another colour, the
    mistake a model that half-learned the attributes makes."""
    rng = random.Random(2)
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    with open(data_dir / "pairs.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            color = row["content"].split("颜色#")[1].split("*")[0]
            wrong = rng.choice([c for c in COLORS if c != color])
            rejected = row["summary"].replace(color, wrong, 1)
            f.write(json.dumps({"prompt": row["content"], "chosen": row["summary"], "rejected": rejected},
                               ensure_ascii=False) + "\n")  # fmt: skip


def main() -> None:
    if "--chatglm6b" in sys.argv:
        build_chatglm6b_assets(demo_corpus(ROOT / "data" / "advertisegen_demo"))
        print("wrote the tiny published ChatGLM-6B layout to assets/tiny-chatglm-6b")
        return
    if "--chatglm" in sys.argv:
        build_chatglm_assets(demo_corpus(ROOT / "data" / "advertisegen_demo"))
        print("wrote the tiny published ChatGLM layouts to assets/tiny-chatglm2, tiny-chatglm3, tiny-glm-4-9b-chat")
        return
    if "--moe" in sys.argv:
        build_moe_configs()
        print("wrote the tiny MoE GLMs to assets/tiny-glm4-moe, tiny-glm4-moe-lite, tiny-glm-moe-dsa")
        return
    if "--pref-data" in sys.argv:  # only the DPO demo's pairs (made from the training rows; no new token)
        build_pref_data(ROOT / "data" / "advertisegen_demo")
        return
    if "--tool-data" in sys.argv:  # only the tool-calling demo's rows (they never enter the tokenizer)
        build_tool_data(ROOT / "data" / "tool_demo")
        return
    for flag, build_config, shape in (
        ("--real-vocab-moe", build_real_vocab_moe_config, "GLM-4.5-shaped MoE"),
        ("--real-vocab", build_real_vocab_config, "GLM-4-shaped"),
    ):
        if flag in sys.argv:
            out = Path(sys.argv[sys.argv.index(flag) + 1])
            build_config(out)
            build_real_vocab_tokenizer(out)
            print(f"wrote a {shape} model directory (vocab {GLM4_REAL_VOCAB_SIZE}) to {out}")
            return
    data_dir = ROOT / "data" / "advertisegen_demo"
    build_data(data_dir)
    corpus = demo_corpus(data_dir)
    tok_dir = ROOT / "assets" / "tiny-glm4"
    vocab_size = build_tokenizer(tok_dir, corpus)
    build_model_configs(vocab_size, tok_dir)
    build_tool_data(ROOT / "data" / "tool_demo")
    build_pref_data(data_dir)
    print(f"wrote data to {data_dir} and tiny models (vocab {vocab_size}) to {ROOT / 'assets'}")


if __name__ == "__main__":
    main()

"""Tokenizers of THUDM's published ChatGLM2/ChatGLM3/glm-4-9b-chat layouts (models/chatglm.py), built from the
checkpoint's `tokenizer.model` with transformers' own translations of the format, every special token at the id
THUDM's tokenizer gives it, and found in text only where THUDM's tokenizer finds it (tests/data/chatglm/ holds
that tokenizer's ids). ChatGLM-6B's is models/chatglm6b_tokenizer.py.
"""

import json
from pathlib import Path

from dist_glm.errors import UserError
from dist_glm.models.chatglm import Layout, check_supported

# ChatGLM2/3's sentencepiece model has no special tokens of its own; their tokenizer numbers these after it.
CHATGLM2_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_SPECIAL = CHATGLM2_SPECIAL + ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# glm-4-9b-chat numbers these after its tiktoken ranks (the same 14 as glm-4-9b-chat-hf's tokenizer.json).
GLM4_SPECIAL = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
]  # fmt: skip
# glm-4-9b-chat's pre-tokenizer pattern (its tokenization_chatglm.py), as tiktoken reads it.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def build_tokenizer(layout: Layout):
    """A fast tokenizer from the checkpoint's tokenizer.model, special tokens at THUDM's ids."""
    check_supported(layout)
    if layout.name == "chatglm":
        return _chatglm6b_tokenizer(layout)
    model_file = layout.path / "tokenizer.model"
    if not model_file.is_file():
        raise UserError(
            f"model_name_or_path='{layout.path}': no tokenizer.model there; the {layout.name} layout keeps its "
            "vocabulary in that file: copy it from the published checkpoint"
        )
    if layout.name == "glm4chat":
        tokenizer = _tiktoken_tokenizer(model_file)
        # glm-4-9b-chat finds its special tokens in text, so its chat_template renders through this tokenizer.
        tok_config = layout.path / "tokenizer_config.json"
        if tok_config.is_file():
            template = json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template")
            tokenizer.chat_template = template if isinstance(template, str) else None
        return tokenizer
    return _sentencepiece_tokenizer(model_file, CHATGLM3_SPECIAL if layout.name == "chatglm3" else CHATGLM2_SPECIAL)


def _chatglm6b_tokenizer(layout: Layout):
    from dist_glm.models.chatglm6b_tokenizer import VOCAB_FILE, build_chatglm6b_tokenizer

    if not (layout.path / VOCAB_FILE).is_file():
        raise UserError(
            f"model_name_or_path='{layout.path}': no {VOCAB_FILE} there; ChatGLM-6B keeps its vocabulary in that "
            "file: copy it from the published checkpoint"
        )
    try:
        return build_chatglm6b_tokenizer(layout.path)
    except ValueError as e:  # its ids disagree with config.json's, or it is not ChatGLM-6B's vocabulary
        raise UserError(f"model_name_or_path='{layout.path}': {str(e).splitlines()[0]}") from None


def _sentencepiece_tokenizer(model_file: Path, specials: list[str]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # transformers' own sentencepiece translation: it follows the model's normalizer and trainer settings.
    spec = json.loads(SpmConverter.build_tokenizer_from_spm_proto(proto, vocab).to_str())
    # The special tokens join the vocabulary after the pieces, not the added tokens: THUDM's tokenizer never
    # finds them in text (encode_special_tokens is off), so "sophisticated" keeps its `sop` and a user's
    # "<|user|>" stays text. The templates ask for them by name.
    spec["model"]["vocab"] = {**vocab, **{t: len(vocab) + k for k, t in enumerate(specials)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), padding_side="left", clean_up_tokenization_spaces=False
    )
    # THUDM's ChatGLM2/3 tokenizer pads with <unk> (id 0) on the left and ends text with </s>. Named after
    # construction, so that they are not added tokens either: sentencepiece reads "</s>" in text as text.
    # (A copy saved with save_pretrained and loaded again does find them in text: transformers registers a
    # loaded tokenizer's eos/unk/pad as added tokens.)
    tokenizer.unk_token = tokenizer.pad_token = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer.eos_token = proto.pieces[proto.trainer_spec.eos_id].piece
    return tokenizer


def _tiktoken_tokenizer(model_file: Path):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(model_file), pattern=GLM4_PATTERN).converted()
    first = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIAL])
    assert all(backend.token_to_id(t) == first + k for k, t in enumerate(GLM4_SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )

"""ChatGLM-6B's tokenizer (`ice_text.model`) as a transformers fast tokenizer, giving THUDM's ids without
running THUDM's tokenization_chatglm.py.

What THUDM's tokenizer does (kept as facts with reference outputs in tests/data/chatglm/, SOURCES.md):
- Before sentencepiece sees the text, "\\n" becomes the piece `<n>`, "\\t" becomes `<|tab|>` and every run of
  2 to 80 spaces becomes `<|blank_N|>` (80 first, then shorter). Sentencepiece then applies its own model
  settings: nmt_nfkc normalization, extra whitespace removed, a dummy-prefix "▁", byte fallback.
- The pieces keep their sentencepiece ids, shifted by `num_image_tokens` (0 in the published
  tokenizer_config.json; 20000, the class default, in the first upload, whose ids started with images).
- `[gMASK]` and `<sop>` are appended AFTER the text (not prepended as in ChatGLM2/3); a pair adds the second
  text and `<eop>`. Padding is on the left with `<pad>` (id 3).
- Registered special tokens (found in text, skipped by `skip_special_tokens`): `<sop>` (bos), `<eop>`
  (eos), `<unk>`, `<pad>`, `[MASK]`, `</s>` (its `end_token`) and `[gMASK]`. `[sMASK]` and the other control
  pieces are never produced from text.
- Decoding is sentencepiece's (control pieces are invisible, `<unk>` reads " ⁇ ", the dummy-prefix spaces
  at the start are dropped), then `<n>`, `<|tab|>` and `<|blank_N|>` are turned back into whitespace.

Built on transformers' own sentencepiece translation (`SpmConverter.build_tokenizer_from_spm_proto`), with
the replacements above as normalizer and decoder steps. Differences from THUDM's class:
- By design: THUDM's `_pad` also returns a 2-D position array and a square attention mask; this tokenizer
  returns the plain 2-D padding mask, and ChatGLM6BForCausalLM computes positions and the prefix mask from
  the ids.
- transformers' fast tokenizers treat an empty second text as no pair: `tok("x", "")` ends after `<sop>`,
  THUDM's adds `<eop>`.
- A run of byte pieces that is not valid UTF-8 (only model output produces one) decodes to one U+FFFD per
  byte; sentencepiece keeps the valid bytes of the run.
"""

import json
from pathlib import Path

VOCAB_FILE = "ice_text.model"
MAX_BLANK = 80  # THUDM's max_blank_length: the longest space run with a piece of its own
SPECIAL_TOKENS = {  # THUDM's tokenizer_config.json names, in its roles
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "[MASK]",
}
EXTRA_SPECIAL = ["[gMASK]", "</s>"]  # THUDM's `gmask_token` and `end_token`
# Sentencepiece piece types (sentencepiece_model.proto): what may be matched in text.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
# Score given to pieces sentencepiece never matches in text (control, byte, unknown): the Unigram lattice of
# `tokenizers` has no piece types, and these pieces score 0 in the file (the best possible score).
NEVER_MATCHED = -1e9


def _read_proto(model_file: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def _image_tokens(directory: Path) -> int:
    """THUDM's `num_image_tokens`: read from tokenizer_config.json, else the class default (20000)."""
    config = directory / "tokenizer_config.json"
    if config.is_file():
        return int(json.loads(config.read_text(encoding="utf-8")).get("num_image_tokens", 20000))
    return 20000


def _whitespace_normalizers() -> list[dict]:
    """THUDM's replacements, in its order, as `tokenizers` normalizer steps (JSON form)."""
    steps = [("\n", "<n>"), ("\t", "<|tab|>")] + [(" " * n, f"<|blank_{n}|>") for n in range(MAX_BLANK, 1, -1)]
    return [{"type": "Replace", "pattern": {"String": old}, "content": new} for old, new in steps]


def _decoder(proto) -> dict:
    """Sentencepiece's decoding followed by THUDM's post-processing. Control pieces are emptied token by token
    (a text that merely spells "[sMASK]" keeps it). All leading spaces are dropped: each comes from a piece's
    "▁" that sentencepiece drops while nothing has been written yet. `<unk>` gets its surface after that
    strip, as sentencepiece never strips it."""
    controls = [p.piece for p in proto.pieces if p.type == CONTROL]
    steps = [{"type": "Replace", "pattern": {"String": c}, "content": ""} for c in controls]
    steps += [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1 << 30, "stop": 0},
        {"type": "Replace", "pattern": {"String": proto.trainer_spec.unk_piece}, "content": " ⁇ "},
        {"type": "Replace", "pattern": {"String": "<n>"}, "content": "\n"},
        {"type": "Replace", "pattern": {"String": "<|tab|>"}, "content": "\t"},
    ]
    steps += [
        {"type": "Replace", "pattern": {"String": f"<|blank_{n}|>"}, "content": " " * n}
        for n in range(2, MAX_BLANK + 1)
    ]
    return {"type": "Sequence", "decoders": steps}


def build_chatglm6b_tokenizer(path):
    """A PreTrainedTokenizerFast giving THUDM's ChatGLM-6B ids. `path`: the checkpoint directory (holding
    ice_text.model, and tokenizer_config.json for `num_image_tokens`) or the ice_text.model file itself."""
    from tokenizers import Tokenizer
    from transformers import AddedToken, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    path = Path(path)
    model_file = path / VOCAB_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: ChatGLM-6B keeps its vocabulary in {VOCAB_FILE}; none there")
    offset = _image_tokens(model_file.parent)
    proto = _read_proto(model_file)
    if proto.trainer_spec.model_type != 1:
        raise ValueError(f"{model_file}: not a Unigram sentencepiece model, so not ChatGLM-6B's {VOCAB_FILE}")
    _check_never_matched(proto, model_file)
    vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else NEVER_MATCHED) for p in proto.pieces]
    spec = json.loads(SpmConverter.build_tokenizer_from_spm_proto(proto, vocab).to_str())
    # THUDM's replacements run on the raw text, before sentencepiece's own normalization.
    spec["normalizer"]["normalizers"][:0] = _whitespace_normalizers()
    spec["decoder"] = _decoder(proto)
    if offset:  # the image ids come first; THUDM reads "<image_N>" as id N
        spec["model"]["vocab"][:0] = [[f"<image_{i}>", NEVER_MATCHED] for i in range(offset)]
        spec["model"]["unk_id"] += offset
    backend = Tokenizer.from_str(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **SPECIAL_TOKENS,
        additional_special_tokens=[AddedToken(t, normalized=False, special=True) for t in EXTRA_SPECIAL],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    _set_post_processor(tokenizer)
    _check_against_config(tokenizer, model_file.parent)
    return tokenizer


def _check_against_config(tokenizer, directory: Path) -> None:
    """The model's config.json names the ids of [gMASK], <sop> and <eop>; a tokenizer that numbers them
    otherwise (tokenizer_config.json's `num_image_tokens` missing or wrong) would feed the model other tokens."""
    config = directory / "config.json"
    if not config.is_file():
        return
    ids = json.loads(config.read_text(encoding="utf-8"))
    wrong = [
        f"{name} is {tokenizer.convert_tokens_to_ids(token)} here, {ids[name]} in config.json"
        for name, token in (("gmask_token_id", "[gMASK]"), ("bos_token_id", "<sop>"), ("eos_token_id", "<eop>"))
        if name in ids and ids[name] != tokenizer.convert_tokens_to_ids(token)
    ]
    if wrong:
        raise ValueError(
            f"{directory}: the tokenizer does not number the special tokens as config.json does ({'; '.join(wrong)}); "
            "ChatGLM-6B's tokenizer_config.json sets num_image_tokens: 0 (without it THUDM's tokenizer shifts every "
            "id by 20000): copy tokenizer_config.json from the published checkpoint"
        )


def _check_never_matched(proto, model_file: Path) -> None:
    """The low score keeps a control or byte piece out of the segmentation only while its name can be spelled
    with other pieces: a character without a piece of its own costs even more (the unknown piece's score is
    set below the lowest). ChatGLM-6B's vocabulary has a piece for every printable ASCII character, so text
    spelling "[sMASK]" or "<0xE4>" comes out as sentencepiece gives it; refuse a vocabulary where it would not."""
    single = {p.piece for p in proto.pieces if p.type in (NORMAL, USER_DEFINED)}
    registered = set(SPECIAL_TOKENS.values()) | set(EXTRA_SPECIAL)  # split off before the model sees the text
    names = [p.piece for p in proto.pieces if p.type in (UNKNOWN, CONTROL, BYTE) and p.piece not in registered]
    missing = sorted({c for name in names for c in name if c not in single})
    if missing:
        raise ValueError(
            f"{model_file}: no piece for the characters {''.join(missing)!r}, which spell its control and byte "
            "pieces' names; the fast tokenizer could then read such a name in text as that piece, which "
            "sentencepiece never does. ChatGLM-6B's ice_text.model has a piece for every printable ASCII character"
        )


def _set_post_processor(tokenizer) -> None:
    """`[gMASK] <sop>` after the text; a pair continues with the second text and `<eop>`."""
    from tokenizers.processors import TemplateProcessing

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>", "<eop>")}
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A:0 [gMASK]:0 <sop>:0",
        pair="$A:0 [gMASK]:0 <sop>:0 $B:1 <eop>:1",
        special_tokens=list(ids.items()),
    )

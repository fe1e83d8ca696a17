"""Data formats -> GLM chat templates: golden ids and masks, label modes, bad rows, csv/parquet, cache."""

import json
import re

import pytest
from transformers import AutoTokenizer

from conftest import REPO, TINY_MODEL
from dist_glm.config import DataConfig, load_config
from dist_glm.data.batching import build_examples
from dist_glm.data.converters import load_conversations
from dist_glm.data.preprocess import tokenize_to_cache
from dist_glm.data.template import IGNORE_INDEX, build_template
from dist_glm.errors import UserError
from dist_glm.models.loading import load_tokenizer

X = IGNORE_INDEX
SYSTEM_MULTI_TURN = {
    "alpaca": {"instruction": "类型#裙", "input": "颜色#红色", "output": "红色裙子", "system": "你是助手",
               "history": [["你好", "好的"]]},
    "sharegpt": {"conversations": [
        {"from": "system", "value": "你是助手"}, {"from": "human", "value": "你好"}, {"from": "gpt", "value": "好的"},
        {"from": "human", "value": "类型#裙\n颜色#红色"}, {"from": "gpt", "value": "红色裙子"}]},
    "openai": {"messages": [
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "好的"}, {"role": "user", "content": "类型#裙\n颜色#红色"},
        {"role": "assistant", "content": "红色裙子"}]},
    "chatglm3": {"conversations": [
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "好的"}, {"role": "user", "content": "类型#裙\n颜色#红色"},
        {"role": "assistant", "content": "红色裙子"}]},
}  # fmt: skip
TOOL_CALL = {
    "sharegpt": {"conversations": [
        {"from": "human", "value": "天气"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
        {"from": "observation", "value": "晴"}, {"from": "gpt", "value": "北京晴"}],
        "tools": '[{"name": "get_weather", "description": "查天气", "parameters": {"type": "object"}}]'},
    "openai": {"messages": [
        {"role": "user", "content": "天气"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "北京晴"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "查天气",
                                                    "parameters": {"type": "object"}}}]},
    "chatglm3": {"conversations": [
        {"role": "system", "content": "", "tools": [
            {"name": "get_weather", "description": "查天气", "parameters": {"type": "object"}}]},
        {"role": "user", "content": "天气"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": "晴"}, {"role": "assistant", "content": "北京晴"}]},
}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def data_cfg(**kw):
    return DataConfig(**kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def encode_file(path, tok, template="glm4", **kw):
    cfg = data_cfg(**kw)
    t = build_template(template, tok, cfg.mask_history, cfg.train_on_prompt)
    return [t.encode(c, cfg.cutoff_len) for c in load_conversations(str(path), cfg, [])]


def test_system_multi_turn_golden_ids_and_mask_identical_across_formats(tmp_path, tok):
    # [gMASK] <sop> <|system|> \n 你是助手 <|user|> \n 你好 <|assistant|> \n 好的 <|user|> \n 类型#裙\n颜色#红色
    # <|assistant|> \n 红色裙子 <|user|>
    want_ids = [702, 704, 706, 198, 160, 121, 254, 424, 107, 161, 232, 102, 162, 231, 233, 707, 198, 160, 121, 254,
                161, 98, 121, 708, 198, 161, 98, 121, 425, 226, 707, 198, 305, 2, 371, 198, 308, 2, 390, 708, 198,
                390, 371, 312, 707]  # fmt: skip
    # Trained: "\n好的<|user|>" and "\n红色裙子<|user|>" (each reply, its newline and its stop token).
    want_labels = [X] * 24 + want_ids[24:31] + [X] * 9 + want_ids[40:]
    for fmt, row in SYSTEM_MULTI_TURN.items():
        (enc,) = encode_file(write_jsonl(tmp_path / f"{fmt}.jsonl", [row]), tok)
        assert enc.input_ids == want_ids, fmt
        assert enc.labels == want_labels, fmt
        assert enc.reference == "红色裙子"


def test_tool_call_golden_text_and_mask_identical_across_formats(tmp_path, tok):
    encs = {fmt: encode_file(write_jsonl(tmp_path / f"{fmt}.jsonl", [row]), tok)[0] for fmt, row in TOOL_CALL.items()}
    ids, labels = encs["sharegpt"].input_ids, encs["sharegpt"].labels
    assert all(e.input_ids == ids and e.labels == labels for e in encs.values())
    text = tok.decode(ids)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")  # glm-4-9b-chat's template
    assert '\n\n# 可用工具\n\n## get_weather\n\n{\n    "name": "get_weather",\n' in text
    assert text.endswith(
        '<|user|>\n天气<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n晴<|assistant|>\n北京晴<|user|>'
    )
    trained = tok.decode([t for t in labels if t != X])
    assert trained == 'get_weather\n{"city": "北京"}<|observation|>\n北京晴<|user|>'


def test_label_modes(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [SYSTEM_MULTI_TURN["openai"]])
    (last_only,) = encode_file(path, tok, mask_history=True)
    assert tok.decode([t for t in last_only.labels if t != X]) == "\n红色裙子<|user|>"
    (everything,) = encode_file(path, tok, train_on_prompt=True)
    assert everything.labels[:2] == [X, X] and everything.labels[2:] == everything.input_ids[2:]


def test_advertisegen_custom_columns_and_chatglm_templates(tmp_path, tok):
    path = write_jsonl(tmp_path / "ad.jsonl", [{"prompt": "类型#裙", "answer": "红色"}])
    tok3 = AutoTokenizer.from_pretrained(TINY_MODEL)
    tok3.add_special_tokens({"additional_special_tokens": ["sop", "</s>"]}, replace_extra_special_tokens=False)
    (glm3,) = encode_file(path, tok3, "chatglm3", prompt_column="prompt", response_column="answer")
    assert tok3.decode(glm3.input_ids) == "[gMASK]sop<|user|>\n类型#裙<|assistant|>\n红色<|endoftext|>"
    (glm2,) = encode_file(path, tok3, "chatglm2", prompt_column="prompt", response_column="answer")
    assert tok3.decode(glm2.input_ids) == "[gMASK]sop[Round 1]\n\n问：类型#裙\n\n答：红色<|endoftext|>"
    assert tok3.decode([t for t in glm2.labels if t != X]) == "红色<|endoftext|>"
    # The original ChatGLM-6B: rounds from 0, single newlines, [gMASK]<sop> after the prompt.
    two_rounds = write_jsonl(tmp_path / "two.jsonl", [SYSTEM_MULTI_TURN["openai"]])
    (glm1,) = encode_file(two_rounds, tok3, "chatglm")
    assert tok3.decode(glm1.input_ids) == (
        "[Round 0]\n问：你是助手\n你好\n答：好的\n[Round 1]\n问：类型#裙\n颜色#红色\n答："
        "[gMASK]<sop>红色裙子<|endoftext|>"
    )
    assert tok3.decode([t for t in glm1.labels if t != X]) == "红色裙子<|endoftext|>"
    assert tok3.decode(glm1.prompt_ids).endswith("答：[gMASK]<sop>")


def test_chat_template_check_against_the_tokenizers_own(tok):
    from dist_glm.data.template import chat_template_mismatch, choose_template

    assert choose_template("auto", tok, "glm") == "glm4" and choose_template("auto", tok, "glm4") == "glm4_0414"
    assert chat_template_mismatch(build_template("glm4", tok), tok) is None
    tok2 = AutoTokenizer.from_pretrained(TINY_MODEL)
    tok2.add_special_tokens({"additional_special_tokens": ["sop"]}, replace_extra_special_tokens=False)
    assert choose_template("auto", tok2, "chatglm") == "chatglm3"  # it also has <|user|>
    message = chat_template_mismatch(build_template("chatglm2", tok2), tok2)
    assert "renders a probe prompt as" in message and "check the `template` setting" in message
    assert (
        "first differ at token 1: the tokenizer's '[gMASK]' | '<sop><|system|>\\n你是', ours '[gMASK]' | 'sop[Round"
        in message
    )


def test_csv_and_parquet_through_datasets(tmp_path, tok):
    import datasets

    rows = [
        {"instruction": "类型#裙", "input": "", "output": "红色"},
        {"instruction": "你好", "input": "", "output": "好"},
    ]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    jsonl = encode_file(write_jsonl(tmp_path / "a.jsonl", rows), tok)
    for name in ("a.csv", "a.parquet"):
        got = encode_file(tmp_path / name, tok)
        assert [e.input_ids for e in got] == [e.input_ids for e in jsonl], name


GOOD = {"content": "类型#裙", "summary": "红色"}
BAD_ROWS = [
    (b'{"content": "a", ', "invalid JSON"),
    (json.dumps({"content": "a"}).encode(), "missing field 'summary'"),
    (json.dumps({"content": "a", "summary": 3}).encode(), "field 'summary' must be a string, got int"),
    (b'{"content": "\xff\xfe", "summary": "b"}', "not UTF-8 (byte 0xff)"),
    (b'{"content": "a\\ud800b", "summary": "c"}', "turn 0 holds a lone surrogate (\\ud800), which is not text"),
    (b'{"content": "a", "summary": null}', "field 'summary' is null; give a string"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS, ids=["json", "missing", "type", "utf8", "surrogate", "null"])
def test_bad_rows_stop_with_file_and_line_or_are_skipped_and_reported(tmp_path, tok, line, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD, ensure_ascii=False) + "\n").encode() + line + b"\n")
    with pytest.raises(UserError, match=rf"d.jsonl:2: {re.escape(message)}.*on_invalid: skip"):
        build_examples(str(path), tok, data_cfg(), "glm4")
    examples, stats = build_examples(str(path), tok, data_cfg(on_invalid="skip"), "glm4")
    assert len(examples) == 1 and stats.rows == 2
    assert stats.skipped == [{"where": f"{path}:2", "error": stats.skipped[0]["error"]}]
    assert message in stats.skipped[0]["error"]


@pytest.mark.parametrize("row,message", [
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, r"turn 1 is 'user' but expected assistant"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"must end with an assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"turn 0 is 'assistant' but expected user"),
], ids=["role", "alternation", "no-reply", "starts-with-reply"])  # fmt: skip
def test_conversation_errors(tmp_path, tok, row, message):
    good = SYSTEM_MULTI_TURN["sharegpt" if "conversations" in row else "openai"]  # one format per file
    path = write_jsonl(tmp_path / "c.jsonl", [row, good])
    with pytest.raises(UserError, match=rf"c.jsonl:1: .*{message}"):
        build_examples(str(path), tok, data_cfg(), "glm4")
    examples, stats = build_examples(str(path), tok, data_cfg(on_invalid="skip"), "glm4")
    assert len(examples) == 1 and [r["where"] for r in stats.skipped] == [f"{path}:1"]
    assert re.search(message, stats.skipped[0]["error"])


def test_csv_rows_are_reported_by_their_line_in_the_file(tmp_path, tok):
    (tmp_path / "a.csv").write_text("content,summary\n类型#裙,红色\n类型#裤,\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"a.csv:3: "):  # the header is line 1
        build_examples(str(tmp_path / "a.csv"), tok, data_cfg(), "glm4")


def test_a_directory_is_not_a_missing_file(tmp_path):
    from dist_glm.data.sources import check_data_paths

    write_jsonl(tmp_path / "part1.jsonl", [GOOD])
    (problem,) = check_data_paths(str(tmp_path), "dataset")
    expected = f"dataset: '{tmp_path}' is a directory; give the data files in it, comma-separated"
    assert problem == f"{expected} (e.g. {tmp_path / 'part1.jsonl'})"


def test_rows_with_empty_turns_are_counted_in_the_summary(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [GOOD, {"content": "类型#裙", "summary": ""}, {"content": " ", "summary": "x"}]
    )
    examples, stats = build_examples(str(path), tok, data_cfg(), "glm4")
    assert len(examples) == 3 and stats.with_empty_turns == 2
    assert "WARNING: 2 rows have an empty user or assistant turn" in stats.summary("dataset")


def test_file_level_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: the file has no rows"):
        build_examples(str(tmp_path / "empty.jsonl"), tok, data_cfg(on_invalid="skip"), "glm4")
    write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(UserError, match="odd.jsonl: cannot tell the data format.*set dataset_format"):
        build_examples(str(tmp_path / "odd.jsonl"), tok, data_cfg(), "glm4")


def test_truncated_samples_are_counted_and_keep_their_reply(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    # The prompt alone fills the 8-token cutoff; the answer-safe split still gives the 3-token reply
    # ("\n", "红色", <|user|>) its room, so the samples are truncated but none is dropped.
    examples, stats = build_examples(str(path), tok, data_cfg(cutoff_len=8), "glm4")
    assert len(examples) == 2 and stats.truncated == 2 and stats.dropped_no_labels == 0
    assert all(len(e.input_ids) == 8 and sum(t != X for t in e.labels) == 3 for e in examples)


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    cfg = data_cfg(data_cache_dir=str(tmp_path / "cache"))
    first, tokenized = tokenize_to_cache(str(path), tok, str(TINY_MODEL), "glm4", cfg)
    assert tokenized
    again, tokenized = tokenize_to_cache(str(path), tok, str(TINY_MODEL), "glm4", cfg)
    assert again == first and not tokenized
    write_jsonl(path, [GOOD, GOOD])
    changed, tokenized = tokenize_to_cache(str(path), tok, str(TINY_MODEL), "glm4", cfg)
    assert tokenized and changed != first
    other_setting, tokenized = tokenize_to_cache(
        str(path), tok, str(TINY_MODEL), "glm4", data_cfg(data_cache_dir=str(tmp_path / "cache"), cutoff_len=16)
    )
    assert tokenized and other_setting != changed


def cached_rows(tmp_path, rows):
    """`rows` written as a jsonl file and tokenized into the cache: (file, tokenizer, data config, cache dir)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tok = load_tokenizer(str(TINY_MODEL))
    cfg = load_config(["--model_name_or_path=m", f"--dataset={path}", "--output_dir=o"], default_yaml=None).data
    cache, _ = tokenize_to_cache(str(path), tok, str(TINY_MODEL), "glm4", cfg)
    return path, tok, cfg, cache


def test_the_cache_is_plain_memory_mapped_data_equal_to_the_encoding(tmp_path):
    from dist_glm.data.batching import build_examples
    from dist_glm.data.preprocess import load_cache

    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"一款{c}的裙子"} for c in ("红色", "蓝色", "白色")]
    path, tok, cfg, cache = cached_rows(tmp_path, rows)
    assert cache.is_dir() and not list(cache.glob("*.pkl"))
    cached, stats = load_cache(cache)
    direct, direct_stats = build_examples(str(path), tok, cfg, "glm4")
    assert list(cached) == direct and stats == direct_stats and cached.lengths() == [len(e.input_ids) for e in direct]
    assert cached[-1] == direct[-1] and cached[1:] == direct[1:]


def test_a_crafted_pickle_in_the_cache_is_refused_and_never_runs(tmp_path):
    import numpy as np

    from dist_glm.data.preprocess import load_cache

    path, tok, cfg, cache = cached_rows(tmp_path, [{"content": "类型#裙", "summary": "裙子"}])
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = np.empty(1, dtype=object)
    evil[0] = Payload()
    target = cache / "input_ids.npy"
    np.save(target, evil, allow_pickle=True)
    assert b"pwned" in target.read_bytes()  # the file really carries the payload
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["input_ids.npy"] = target.stat().st_size  # even with a matching manifest
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not plain data"):
        load_cache(cache)
    assert not marker.exists()


def test_a_half_written_cache_is_never_used(tmp_path):
    path, tok, cfg, cache = cached_rows(tmp_path, [{"content": "类型#裙", "summary": "裙子"}])
    labels = cache / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:-4])  # cut short, as a killed copy or a full disk leaves it
    again, tokenized = tokenize_to_cache(str(path), tok, str(TINY_MODEL), "glm4", cfg)
    assert (
        tokenized
        and again == cache
        and labels.stat().st_size == json.loads((cache / "manifest.json").read_text())["labels.npy"]
    )


def test_parallel_tokenization_gives_the_same_samples(tmp_path):
    """Workers tokenize contiguous chunks (12 here): the samples and every count equal one process's, with a
    per-file cap, a skipped row and two files; a bad row under on_invalid=error is the same one-line error."""
    tok = load_tokenizer(str(TINY_MODEL))
    demo = (REPO / "data" / "advertisegen_demo" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(demo[:150] + ["{not json"] + demo[150:200]) + "\n", encoding="utf-8")
    second.write_text("\n".join(demo[200:260]) + "\n", encoding="utf-8")
    flags = ["--model_name_or_path=m", f"--dataset={first},{second}", "--output_dir=o", "--on_invalid=skip"]
    one = load_config(flags, None).data
    three = load_config([*flags, "--preprocessing_num_workers=3"], None).data
    serial, s_stats = build_examples(f"{first},{second}", tok, one, "glm4", max_samples=180)
    parallel, p_stats = build_examples(f"{first},{second}", tok, three, "glm4", max_samples=180)
    assert parallel == serial and p_stats == s_stats
    assert len(serial) == 180 + 60 and s_stats.rows == 261 and [s["where"] for s in s_stats.skipped] == [f"{first}:151"]
    strict = load_config([*flags[:-1], "--preprocessing_num_workers=3"], None).data
    with pytest.raises(UserError, match=f"{first}:151: invalid JSON"):
        build_examples(f"{first},{second}", tok, strict, "glm4")


def test_what_truncation_costs_is_counted_and_a_cut_tool_call_is_not_trained(tmp_path):
    tools = [{"name": f"tool_{i}", "description": "查询天气" * 20, "parameters": {"type": "object"}} for i in range(3)]
    long_args = json.dumps({"city": "北京" * 60}, ensure_ascii=False)
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "tool_0", "arguments": long_args}}]}
    rows = [
        {"messages": [{"role": "user", "content": "北京天气?"}, call], "tools": tools},  # the call cannot fit
        {"messages": [{"role": "user", "content": "你好" * 200}, {"role": "assistant", "content": "好"}]},
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(
        ["--model_name_or_path=m", f"--dataset={path}", "--output_dir=o", "--cutoff_len=64"], default_yaml=None
    ).data
    examples, stats = build_examples(str(path), load_tokenizer(str(TINY_MODEL)), cfg, "glm4")
    assert len(examples) == 2  # the tool-call sample is dropped, the others kept
    assert stats.lost["tool_call"] == [1, [f"{path}:1"]] and stats.lost["question"][1] == [f"{path}:2"]
    line = stats.summary("dataset")
    assert "1 were dropped: their tool call did not fit" in line and "1 lost the end of their prompt" in line


def test_leading_system_turns_are_one_system_prompt(tmp_path):
    # Two system messages (the server maps OpenAI's developer role to system): neither may be dropped.
    row = {"messages": [{"role": "system", "content": "简洁"}, {"role": "system", "content": "中文"},
                        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}  # fmt: skip
    path = tmp_path / "sys.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (conv,) = load_conversations(str(path), DataConfig(), [])
    assert conv["system"] == "简洁\n中文" and [m["role"] for m in conv["messages"]] == ["user", "assistant"]


def test_parallel_tool_calls_with_consecutive_tool_results_are_accepted():
    # Two parallel calls answered by two `tool` messages in a row: the normal shape of parallel tool use.
    from dist_glm.data.converters import check_alternation, from_openai

    row = {
        "messages": [
            {"role": "user", "content": "北京和上海天气"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "北京"}'}},
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "上海"}'}},
            ]},
            {"role": "tool", "content": "晴"},
            {"role": "tool", "content": "雨"},
            {"role": "assistant", "content": "北京晴，上海雨"},
        ]
    }  # fmt: skip
    conv = from_openai(row, None)
    check_alternation(conv["messages"])
    assert [m["role"] for m in conv["messages"]] == [
        "user",
        "assistant",
        "assistant",
        "observation",
        "observation",
        "assistant",
    ]
    with pytest.raises(Exception, match="does not alternate"):  # a user turn right after a call still does not
        check_alternation([conv["messages"][0], conv["messages"][1], {"role": "user", "content": "x"}])


def test_max_samples_caps_each_file_as_llamafactory_does(tmp_path):
    # identity,alpaca_en_demo at max_samples 1000 trains 1,090 rows there, not 1,000: each file is
    # capped, not the total; a second large file is never dropped entirely.
    from dist_glm.config import load_config
    from dist_glm.data.batching import build_examples
    from dist_glm.models.loading import load_tokenizer

    files = []
    for name, n in (("small", 3), ("large", 10), ("larger", 12)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"{name} {i}", "output": "好"}) + "\n" for i in range(n)))
        files.append(str(path))
    cfg = load_config(["--model_name_or_path=m", f"--dataset={','.join(files)}", "--output_dir=o"], None)
    examples, stats = build_examples(cfg.data.dataset, load_tokenizer("assets/tiny-glm4"), cfg.data, "glm4", 5)
    assert [stats.files[f]["samples"] for f in files] == [3, 5, 5] and len(examples) == 13


def test_every_bad_row_is_counted_and_the_first_ten_are_shown(tmp_path):
    from dist_glm.config import load_config
    from dist_glm.data.converters import load_conversations
    from dist_glm.errors import UserError

    data = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"})
    data.write_text("\n".join([good] + ['{"instruction": "q"}'] * 12 + [good]) + "\n")
    cfg = load_config(["--model_name_or_path=m", f"--dataset={data}", "--output_dir=o"], None)
    with pytest.raises(UserError) as err:
        load_conversations(cfg.data.dataset, cfg.data, [])
    problems = err.value.problems
    assert len(problems) == 10 and problems[0].startswith(f"{data}:2: missing field 'output'")
    assert problems[-1].endswith("(12 bad rows; 2 more: fix them, or set on_invalid: skip to skip them)")


def test_round_templates_refuse_tool_turns_instead_of_pairing_them_by_position():
    from dist_glm.data.template import build_template
    from dist_glm.errors import UserError
    from dist_glm.models.loading import load_tokenizer

    tok = load_tokenizer("assets/tiny-glm4")
    tok.add_special_tokens({"additional_special_tokens": ["sop"]}, replace_extra_special_tokens=False)
    conv = {
        "system": "", "tools": None, "where": "rows.json:7",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                     {"role": "observation", "content": "o"}, {"role": "assistant", "content": "b"}],
    }  # fmt: skip
    for name in ("chatglm", "chatglm2"):
        with pytest.raises(UserError, match=f"rows.json:7: template {name} has no tool calls or tool results"):
            build_template(name, tok).encode(conv, 256)

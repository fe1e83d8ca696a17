"""GLM-4 template golden ids, answer-safe truncation, and the split-independent global sampler."""

import pytest
import torch
from transformers import AutoTokenizer

from conftest import TINY_MODEL
from dist_glm.data.batching import Example, GlobalBatchSampler, collate, pad_share
from dist_glm.data.template import IGNORE_INDEX, build_template


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def test_single_turn_golden_ids_and_mask(tok):
    enc = build_template("glm4", tok).encode(
        {"messages": [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "红色"}]}, cutoff_len=64
    )
    ids, labels = enc.input_ids, enc.labels
    # [gMASK] <sop> <|user|> \n 类型 # 裙 <|assistant|> \n 红色 <|user|>
    assert ids == [702, 704, 707, 198, 305, 2, 371, 708, 198, 390, 707]
    assert labels == [IGNORE_INDEX] * 8 + [198, 390, 707]  # "\n", the reply and the turn-ending token


def test_prompt_matches_the_tokenizers_own_chat_template(tok):
    messages = [{"role": "system", "content": "你是广告文案助手"}, {"role": "user", "content": "类型#裙*颜色#红色"}]
    ours = build_template("glm4", tok).encode_prompt({"system": messages[0]["content"], "messages": messages[1:]})
    theirs = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(theirs)


def conv(*turns, system="", tools=None):
    roles = ["user", "assistant"]
    return {
        "system": system,
        "tools": tools,
        "messages": [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)],
    }


def test_truncation_keeps_the_answer(tok):
    template = build_template("glm4", tok)
    long_prompt = "类型#裙*颜色#红色*" * 40
    reply = "".join(f"{i} fox jumps; " for i in range(40))  # well over 64 tokens in the tiny vocab
    assert len(tok.encode(reply, add_special_tokens=False)) > 64
    enc = template.encode(conv(long_prompt, reply), cutoff_len=64)
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels) == 64 and enc.truncated
    # Both sides are too long: the reply side gets exactly half the budget.
    assert sum(x != IGNORE_INDEX for x in labels) == 32
    assert ids[:3] == template.prefix + [template.role_ids["user"]]  # the prompt starts intact
    i = ids.index(template.role_ids["assistant"])
    assert i == 31 and labels[: i + 1] == [IGNORE_INDEX] * (i + 1)  # the header survives, unlabelled
    # A short prompt leaves the reply everything else.
    enc = template.encode(conv("裙", reply), 64)
    prompt_len = len(template.encode_prompt(conv("裙")))
    assert len(enc.input_ids) == 64 and sum(x != IGNORE_INDEX for x in enc.labels) == 64 - prompt_len


def test_long_history_loses_its_oldest_rounds_first(tok):
    template = build_template("glm4", tok)
    turns = [f"问题{k} " + "颜色#红色*" * 6 if k % 2 == 0 else f"回答{k}" for k in range(12)]
    full = template.encode(conv(*turns), cutoff_len=4096)
    enc = template.encode(conv(*turns), cutoff_len=len(full.input_ids) - 5)
    assert enc.truncated and len(enc.input_ids) <= len(full.input_ids) - 5
    text = tok.decode(enc.input_ids)
    assert "问题0" not in text and "问题10" in text and "回答11" in text  # newest round intact
    assert enc.input_ids[:2] == template.prefix
    # The first kept token after the prefix is a role token whose (dropped) reply is gone: untrained.
    assert enc.labels[2] == IGNORE_INDEX


def test_empty_reply_still_trains_the_newline_and_stop_token(tok):
    enc = build_template("glm4", tok).encode(conv("类型#裙", ""), 64)
    assert [x for x in enc.labels if x != IGNORE_INDEX] == [198, tok.convert_tokens_to_ids("<|user|>")]


def test_sampler_gives_the_same_global_batch_for_every_split():
    n, seed = 50, 3
    ref = GlobalBatchSampler(n, 4, 1, 1, seed)
    for mbs, gas, world in [(2, 1, 2), (2, 2, 1), (1, 2, 2), (1, 4, 1), (1, 1, 4)]:
        s = GlobalBatchSampler(n, mbs, gas, world, seed)
        assert s.steps_per_epoch == ref.steps_per_epoch == 12
        for step in (0, 5, 11, 12, 30):  # crossing epochs reshuffles identically
            got = sorted(i for r in range(world) for mb in s.micro_batches(step, r) for i in mb)
            assert got == sorted(ref.micro_batches(step, 0)[0])


def test_group_by_length_keeps_each_steps_samples_for_every_split_and_cuts_padding():
    n, seed = 1000, 3
    lengths = [int(x) for x in torch.randint(5, 400, (n,), generator=torch.Generator().manual_seed(0))]
    examples = [Example([1] * k, [1] * k, [], "") for k in lengths]
    ref = GlobalBatchSampler(n, 4, 1, 1, seed, lengths)
    for mbs, gas, world in [(2, 1, 2), (2, 2, 1), (1, 1, 4)]:
        s = GlobalBatchSampler(n, mbs, gas, world, seed, lengths)
        for step in (0, 5, 249, 250, 700):  # 250 steps per epoch: crossing epochs regroups identically
            got = sorted(i for r in range(world) for mb in s.micro_batches(step, r) for i in mb)
            assert got == sorted(ref.micro_batches(step, 0)[0])
    epoch = [i for step in range(250) for i in ref.micro_batches(step, 0)[0]]
    assert sorted(epoch) == list(range(n))  # every sample once per epoch
    plain = GlobalBatchSampler(n, 2, 1, 2, seed)
    grouped = GlobalBatchSampler(n, 2, 1, 2, seed, lengths)
    assert pad_share(examples, grouped) < pad_share(examples, plain) / 4
    # The global batches of a window come in random order, not longest first.
    firsts = [lengths[ref.micro_batches(step, 0)[0][0]] for step in range(50)]
    assert firsts != sorted(firsts, reverse=True)


def test_sampler_epochs_are_permutations():
    s = GlobalBatchSampler(20, 5, 1, 1, seed=1)
    epoch0 = [i for step in range(4) for i in s.micro_batches(step, 0)[0]]
    epoch1 = [i for step in range(4, 8) for i in s.micro_batches(step, 0)[0]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1


def test_collate_right_pads_and_masks():
    batch = collate([Example([1, 2, 3], [-100, 2, 3], [], ""), Example([4], [4], [], "")], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_val_size_holds_out_a_seeded_split_that_never_leaks():
    from dist_glm.data.batching import Example
    from dist_glm.data.loading import split_held_out

    # 20 distinct samples, and sample 0 repeated 5 times: the copies must stay together.
    examples = [Example([i, i + 1], [i, i + 1], [i], "") for i in range(20)] + [Example([0, 1], [0, 1], [0], "")] * 5
    train, held = split_held_out(examples, 0.2, seed=3)
    assert len(train) + len(held) == 25 and 5 <= len(held) <= 10
    assert not {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in held}
    again_train, again_held = split_held_out(examples, 0.2, seed=3)
    assert [e.input_ids for e in again_held] == [e.input_ids for e in held]  # every rank, every run
    _, other = split_held_out(examples, 0.2, seed=4)
    assert [e.input_ids for e in other] != [e.input_ids for e in held]
    assert len(split_held_out(examples, 3, seed=0)[1]) >= 3


def test_val_size_settings_are_checked():
    from dist_glm.config import load_config
    from dist_glm.errors import UserError

    base = ["--model_name_or_path=m", "--dataset=d.jsonl", "--output_dir=o"]
    assert load_config(base + ["--val_size=0.1", "--eval_steps=5", "--predict_with_generate"]).data.val_size == 0.1
    with pytest.raises(UserError, match="val_size=2.5 must be a fraction"):
        load_config(base + ["--val_size=2.5"])
    with pytest.raises(UserError, match="val_size and eval_dataset are both set"):
        load_config(base + ["--val_size=0.1", "--eval_dataset=e.jsonl"])


def test_prepare_shows_samples_with_the_trained_spans_marked(tmp_path, capsys):
    import json

    from dist_glm import cli

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "类型#裙", "summary": "红色"}, ensure_ascii=False) + "\n", encoding="utf-8")
    cli.prepare_main(
        [
            f"--model_name_or_path={TINY_MODEL}",
            f"--dataset={data}",
            f"--output_dir={tmp_path / 'o'}",
            "--show_samples=1",
        ]
    )
    out = capsys.readouterr().out
    sample = out[out.index("--- sample 1") :]
    # The reply, the newline the model writes first, and the stop token train; the prompt does not.
    assert sample.splitlines()[0] == "--- sample 1 (11 tokens, 3 trained)"  # "\n", "红色", "<|user|>"
    assert "<|user|>\n类型#裙<|assistant|>⟦\n红色<|user|>⟧" in sample


def test_prefetcher_builds_the_next_step_ahead_and_hands_out_the_same_batches():
    import threading

    from dist_glm.data.prefetch import Prefetcher

    built, lock = [], threading.Lock()

    def build(step):
        with lock:
            built.append((step, threading.current_thread().name))
        if step == 4:
            raise ValueError("row 7 of step 4")
        return [{"input_ids": torch.full((2, 3), step)}]

    prefetch = Prefetcher(build, pin=False)
    got = [prefetch.get(s, s + 1)[0]["input_ids"][0, 0].item() for s in (1, 2, 3)]
    assert got == [1, 2, 3]
    with pytest.raises(ValueError, match="row 7 of step 4"):  # a failure surfaces at its own step
        prefetch.get(4, None)
    prefetch.close()
    # Step 1 was built on the spot (nothing ahead yet); steps 2, 3 and 4 in the background thread.
    assert built[0] == (1, threading.current_thread().name)
    assert [s for s, name in built[1:] if name.startswith("collate")] == [2, 3, 4]


def test_prepare_tokenizes_a_recipe_whose_evaluation_settings_need_an_eval_set(tmp_path, capsys):
    # A training recipe with predict_with_generate / eval_steps and no eval set yet: training refuses it,
    # but tokenizing its training data needs none of that.
    import json

    from dist_glm import cli

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "类型#裙", "summary": "红色"}, ensure_ascii=False) + "\n", encoding="utf-8")
    args = [f"--model_name_or_path={TINY_MODEL}", f"--dataset={data}", f"--output_dir={tmp_path / 'o'}"]
    cli.prepare_main([*args, "--predict_with_generate=true", "--eval_steps=10", "--show_samples=1"])
    assert "--- sample 1" in capsys.readouterr().out

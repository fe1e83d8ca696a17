"""Continued training from an earlier result: a full model, an adapter (continued or merged), a
checkpoint's weights (and moments). The continued run starts exactly where the earlier one ended: its
eval loss at step 0 is the earlier run's final eval loss."""

import json

import pytest

from dist_glm.config import load_config
from dist_glm.training.continued import adopt_adapter
from tests.conftest import REPO, base_args, read_metrics, run_train
from tests.test_method_matrix import METHODS

STEPS = 4


def first_run(tmp_path, data, pretrained, eval_data, method, **extra):
    out = tmp_path / "run1"
    args = base_args(
        out,
        data,
        model_name_or_path=pretrained,
        train_from_scratch=False,
        finetuning_type=method,
        eval_dataset=eval_data,
        max_steps=STEPS,
        **{**METHODS[method], **extra},
    )
    run_train(args, nprocs=None)
    return out, read_metrics(out, "eval/loss")[STEPS]


def continued_run(out, data, eval_data, **settings):
    settings = dict(dict(train_from_scratch=False, eval_dataset=eval_data, eval_on_start=True, max_steps=2), **settings)
    return run_train(base_args(out, data, **settings), nprocs=None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "ptuning"])
def test_continued_training_starts_where_the_first_run_ended(tmp_path, varlen_data, pretrained_tiny, eval_data, method):
    run1, final_loss = first_run(tmp_path, varlen_data, pretrained_tiny, eval_data, method)
    run2 = tmp_path / "run2"
    if method == "full":  # a full result is an HF model
        proc = continued_run(run2, eval_data, eval_data, model_name_or_path=run1, finetuning_type="full")
    else:  # its own settings (rank, prefix length) come from the adapter; only the method is named
        proc = continued_run(
            run2, eval_data, eval_data, model_name_or_path=pretrained_tiny, adapter_name_or_path=run1,
            finetuning_type=method, learning_rate=1e-3,
        )  # fmt: skip
        assert f"continuing the {method} adapter {run1}" in proc.stdout
    start = read_metrics(run2, "eval/loss")[0]
    assert abs(start - final_loss) < 1e-5, (start, final_loss)
    assert read_metrics(run2, "train/loss")  # and it trained on
    if method in ("lora", "qlora"):
        saved = json.loads((run2 / "adapter_config.json").read_text())
        first = json.loads((run1 / "adapter_config.json").read_text())
        assert (
            (saved["r"], sorted(saved["target_modules"]))
            == (first["r"], sorted(first["target_modules"]))
            == (
                4,
                sorted(first["target_modules"]),
            )
        )
        assert not [p for p in run2.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file()]  # one adapter


@pytest.mark.slow
def test_merge_adapter_trains_a_new_adapter_on_the_merge_and_the_tools_load_it(
    tmp_path, varlen_data, pretrained_tiny, eval_data
):
    from dist_glm.models.artifacts import load_for_inference
    from tests.test_method_matrix import eval_loss_of

    run1, final_loss = first_run(tmp_path, varlen_data, pretrained_tiny, eval_data, "lora")
    run2 = tmp_path / "run2"
    continued_run(
        run2, varlen_data, eval_data, model_name_or_path=pretrained_tiny, adapter_name_or_path=run1,
        merge_adapter=True, finetuning_type="lora", lora_rank=2, learning_rate=1e-3,
    )  # fmt: skip
    assert abs(read_metrics(run2, "eval/loss")[0] - final_loss) < 1e-5
    saved = json.loads((run2 / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["base_model_name_or_path"] == str(run2 / "merged_base")
    reported = json.loads((run2 / "all_results.json").read_text())["eval/loss"]
    model = load_for_inference(str(run2))  # the new adapter on the merged base it recorded
    assert abs(eval_loss_of(model, run2, eval_data) - reported) < 1e-4


@pytest.mark.slow
def test_init_from_checkpoint_takes_the_weights_with_a_fresh_schedule_on_other_ranks(
    tmp_path, varlen_data, pretrained_tiny, eval_data
):
    run1, final_loss = first_run(tmp_path, varlen_data, pretrained_tiny, eval_data, "full", save_steps=STEPS)
    ckpt = run1 / f"checkpoint-{STEPS}"
    first_lr = read_metrics(run1, "train/learning_rate")[1]
    # 1 rank at ZeRO-0 wrote it; 2 ranks at ZeRO-3 start from it, with other hyperparameters.
    two = tmp_path / "two"
    args = base_args(
        two, varlen_data, model_name_or_path=pretrained_tiny, train_from_scratch=False, eval_dataset=eval_data,
        eval_on_start=True, max_steps=3, per_device_train_batch_size=2, deepspeed="ds_configs/zero3.json",
        init_from_checkpoint=ckpt, weight_decay=0.0,
    )  # fmt: skip
    run_train(args, nprocs=2)
    assert abs(read_metrics(two, "eval/loss")[0] - final_loss) < 1e-5
    assert read_metrics(two, "train/learning_rate")[1] == pytest.approx(first_lr)  # warmup starts again

    # With its optimizer moments (same world size and stage): same start, a different second step.
    plain, moments = tmp_path / "plain", tmp_path / "moments"
    for out, extra in ((plain, {}), (moments, {"init_optimizer_state": True})):
        args = base_args(
            out, varlen_data, model_name_or_path=pretrained_tiny, train_from_scratch=False, max_steps=3,
            init_from_checkpoint=ckpt, **extra,
        )  # fmt: skip
        run_train(args, nprocs=None)
    a, b = read_metrics(plain, "train/loss"), read_metrics(moments, "train/loss")
    # (Warmup's first rate is 0, so the moments first show in the loss after the second step.)
    assert a[1] == pytest.approx(b[1], abs=1e-6) and abs(a[3] - b[3]) > 1e-4, (a, b)


def adapter_dir(tmp_path, **config):
    d = tmp_path / "lora1"
    d.mkdir()
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (d / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return d


def cfg_for(*flags):
    return load_config(["--model_name_or_path=m", "--dataset=d", "--output_dir=o", *flags], default_yaml=None)


def test_an_adapter_lends_its_settings_and_a_conflicting_flag_is_named(tmp_path):
    d = adapter_dir(tmp_path)
    cfg = cfg_for(f"--adapter_name_or_path={d}", "--finetuning_type=lora")
    assert adopt_adapter(cfg) == []
    assert (cfg.method.lora_rank, cfg.method.lora_target, cfg.method.lora_alpha) == (8, "q_proj,v_proj", 16.0)

    cfg = cfg_for(f"--adapter_name_or_path={d}", "--finetuning_type=lora", "--lora_rank=16")
    (problem,) = adopt_adapter(cfg)
    assert problem.startswith("lora_rank=16 conflicts with the adapter's 8") and "merge_adapter=true" in problem
    cfg = cfg_for(f"--adapter_name_or_path={d}", "--finetuning_type=lora", "--lora_target=v_proj,q_proj")
    assert adopt_adapter(cfg) == []  # the same targets in another order


def test_continuing_needs_the_adapters_own_method(tmp_path):
    d = adapter_dir(tmp_path)
    (problem,) = adopt_adapter(cfg_for(f"--adapter_name_or_path={d}", "--finetuning_type=ptuning"))
    assert "is a lora adapter; set finetuning_type=lora" in problem
    (problem,) = adopt_adapter(cfg_for(f"--adapter_name_or_path={tmp_path}", "--finetuning_type=lora"))
    assert "no adapter_config.json there" in problem
    assert adopt_adapter(cfg_for(f"--adapter_name_or_path={d}", "--merge_adapter", "--finetuning_type=full")) == []


def test_continuation_flags_that_need_each_other():
    from dist_glm.errors import UserError

    for flags, key in (
        (["--merge_adapter"], "merge_adapter=true needs adapter_name_or_path"),
        (["--init_optimizer_state"], "init_optimizer_state=true needs init_from_checkpoint"),
        (["--init_from_checkpoint=c", "--adapter_name_or_path=a"], "init_from_checkpoint and adapter_name_or_path"),
    ):
        with pytest.raises(UserError) as err:
            cfg_for(*flags)
        assert any(p.startswith(key) for p in err.value.problems), err.value.problems


def test_a_mixture_has_each_share_exactly_and_a_fixed_order():
    from dist_glm.data.loading import mix

    new, old = [("new", i) for i in range(300)], [("old", i) for i in range(60)]
    epoch = mix([new, old], [0.8, 0.2], seed=3)
    assert len(epoch) == 360 and sum(s == "old" for s, _ in epoch) == 72  # 20 %: the small file cycles
    assert epoch == mix([new, old], [0.8, 0.2], seed=3) != mix([new, old], [0.8, 0.2], seed=4)
    # Within any stretch of the epoch the share stays near its probability (the order is shuffled).
    first_half = epoch[:180]
    assert abs(sum(s == "old" for s, _ in first_half) / 180 - 0.2) < 0.07
    assert all(s == "new" for s, _ in mix([new, old], [1.0, 0.0], seed=3))  # a zero share is never drawn


def test_mix_probs_and_named_eval_sets_are_checked():
    from dist_glm.data.sources import named_sets
    from dist_glm.errors import UserError

    assert named_sets("a.jsonl,b.jsonl") == {"": "a.jsonl,b.jsonl"}
    assert named_sets("new=a.jsonl,old=b.jsonl,new=c.jsonl") == {"new": "a.jsonl,c.jsonl", "old": "b.jsonl"}
    with pytest.raises(UserError, match="has no name while others do"):
        named_sets("new=a.jsonl,b.jsonl")
    for flags, start in (
        (["--mix_probs=0.5"], "mix_probs has 1 values for 2 dataset files"),
        (["--mix_probs=0.5,0.6"], "mix_probs=0.5,0.6 must be non-negative and sum to 1"),
        (["--mix_probs=a,b"], "mix_probs='a,b' must be comma-separated finite numbers"),
        (["--mix_probs=nan,nan"], "mix_probs='nan,nan' must be comma-separated finite numbers"),  # was a ValueError
        (["--mix_probs=0.5,,0.5"], "mix_probs='0.5,,0.5' must be comma-separated finite numbers"),  # was accepted
    ):
        with pytest.raises(UserError) as err:
            load_config(["--model_name_or_path=m", "--dataset=a.jsonl,b.jsonl", "--output_dir=o", *flags], None)
        assert any(p.startswith(start) for p in err.value.problems), err.value.problems


@pytest.mark.slow
def test_mixed_data_and_named_eval_sets_on_one_and_two_ranks(tmp_path, varlen_data, eval_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import REPO, train_one_and_two_ranks

    old = tmp_path / "old.jsonl"
    old.write_text("".join((REPO / "data/advertisegen_demo/train.jsonl").read_text().splitlines(True)[200:240]))
    settings = dict(
        dataset=f"{varlen_data},{old}", mix_probs="0.75,0.25", eval_dataset=f"new={eval_data},old={old}",
        max_steps=4, eval_steps=2,
    )  # fmt: skip
    one, two, a, b, stdout = train_one_and_two_ranks(tmp_path, varlen_data, "zero2", **settings)
    assert a == pytest.approx(b, abs=2e-5)
    assert "mix_probs: 136 samples per epoch" in stdout
    for run in (one, two):
        new, old_loss = read_metrics(run, "eval/new/loss"), read_metrics(run, "eval/old/loss")
        assert sorted(new) == sorted(old_loss) == [2, 4] and new[4] != old_loss[4]
    assert read_metrics(one, "eval/new/loss") == pytest.approx(read_metrics(two, "eval/new/loss"), abs=2e-5)
    tags = EventAccumulator(str(one / "runs")).Reload().Tags()["scalars"]
    assert {"eval/new/loss", "eval/old/loss", "eval/new/perplexity"} <= set(tags)


def test_raw_text_is_one_document_per_line_every_token_trained(tmp_path):
    from dist_glm.data.batching import build_examples
    from dist_glm.models.loading import load_tokenizer
    from tests.conftest import TINY_MODEL

    tok = load_tokenizer(str(TINY_MODEL))
    txt, jsonl = tmp_path / "domain.txt", tmp_path / "domain.jsonl"
    docs = ["这款连衣裙很好看", "宽松的版型" * 12]
    txt.write_text("\n".join(docs[:1] + [""] + docs[1:]) + "\n", encoding="utf-8")  # blank lines are not documents
    jsonl.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cfg = cfg_for("--cutoff_len=16").data
    from_txt, stats = build_examples(str(txt), tok, cfg, "glm4")
    from_jsonl, _ = build_examples(str(jsonl), tok, cfg, "glm4")
    assert [e.input_ids for e in from_txt] == [e.input_ids for e in from_jsonl]
    prefix = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    first = prefix + tok.encode(docs[0], add_special_tokens=False) + [tok.eos_token_id]
    assert from_txt[0].input_ids == from_txt[0].labels == first  # no template, every token trained
    # The long document is split into consecutive pieces of cutoff_len, nothing dropped.
    second = prefix + tok.encode(docs[1], add_special_tokens=False) + [tok.eos_token_id]
    assert sum((e.input_ids for e in from_txt[1:]), []) == second and all(len(e.input_ids) <= 16 for e in from_txt)
    assert stats.text_samples == len(from_txt) and stats.truncated == 0


@pytest.mark.slow
def test_continued_pretraining_on_raw_text_packs_by_default(tmp_path, pretrained_tiny):
    from tests.conftest import REPO

    rows = [json.loads(line) for line in (REPO / "data/advertisegen_demo/train.jsonl").open(encoding="utf-8")][:200]
    txt = tmp_path / "domain.txt"
    txt.write_text("".join(r["summary"] + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "cpt"
    args = base_args(out, txt, model_name_or_path=pretrained_tiny, train_from_scratch=False, max_steps=6, cutoff_len=64)
    proc = run_train(args, nprocs=None)
    assert "packing: on, the default for raw text" in proc.stdout
    losses = read_metrics(out, "train/loss")
    assert losses[6] < losses[1], losses


def test_an_adapter_says_which_method_continues_it_and_where_its_base_is(tmp_path, monkeypatch):
    # LLaMA-Factory users continue an adapter without restating finetuning_type; and an adapter trained in
    # one working directory must find its base from another.
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from dist_glm.config import ModelConfig
    from dist_glm.models.loading import load_model
    from dist_glm.training.continued import adopt_adapter

    monkeypatch.chdir(REPO)
    base = load_model(ModelConfig(model_name_or_path="assets/tiny-glm4", train_from_scratch=True), {}, torch.float32, 0)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(REPO / "assets" / "tiny-glm4")  # absolute, not "assets/..."

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({**PrefixTuningConfig(num_virtual_tokens=4).to_dict()}))
    recipe = [
        "--model_name_or_path=assets/tiny-glm4",
        "--dataset=d",
        "--output_dir=o",
        f"--adapter_name_or_path={prefix}",
    ]
    cfg = load_config(recipe, None)
    assert adopt_adapter(cfg) == [] and cfg.method.finetuning_type == "ptuning"  # left at its default: adopted
    cfg = load_config([*recipe, "--finetuning_type=full"], None)
    (problem,) = adopt_adapter(cfg)  # said otherwise: a conflict, with both fixes
    assert "is a ptuning adapter; set finetuning_type=ptuning to continue it, or merge_adapter=true" in problem

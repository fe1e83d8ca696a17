"""The Mixture-of-Experts GLMs: GLM-4.5/4.6/4.7 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite), GLM-5.x
(glm_moe_dsa), as tiny checkpoints of the real structure (assets/tiny-*-moe*).

What LoRA adapts (pinned per family), routing metrics, what a saved model keeps (the routers'
e_score_correction_bias, the MTP layer transformers does not load), and the guarantees with real
2-rank processes: the same global batch gives the same losses under ZeRO-3 (with the eager per-expert
loop, which hangs without leaf modules) and accumulation, routing counted over the global batch, exact
resume, exported models equal.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, base_args, read_metrics, run_script, run_train
from dist_glm.config import Config
from dist_glm.errors import UserError
from dist_glm.methods import lora, lora_targets
from dist_glm.models import moe

FAMILIES = {"glm4_moe": "tiny-glm4-moe", "glm4_moe_lite": "tiny-glm4-moe-lite", "glm_moe_dsa": "tiny-glm-moe-dsa"}
ATTENTION = {
    "glm4_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "glm4_moe_lite": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
}
ATTENTION["glm_moe_dsa"] = ATTENTION["glm4_moe_lite"]
MTP_LAYER = 3  # the tiny glm4_moe has 3 decoder layers; its checkpoint holds one more, as GLM-4.5's does


def build(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "assets" / FAMILIES[family]))


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory):
    """Each family saved as a pretrained checkpoint: seeded weights, routers with a non-zero
    e_score_correction_bias (real checkpoints have trained ones), and for glm4_moe an MTP layer
    (model.layers.3.*) that transformers does not load."""
    out = {}
    for family, asset in FAMILIES.items():
        path = tmp_path_factory.mktemp("moe") / asset
        model = build(family)
        if family == "glm_moe_dsa":
            # DSA's indexer picks the top index_topk keys per query: a selection, discontinuous, so hidden
            # states equal up to round-off (another batch shape) can pick other keys. The split-equivalence
            # is exact where it keeps every key, as GLM-5 (index_topk 2048) does for rows up to 2048 tokens.
            model.config.index_topk = 64
        for router in moe.moe_blocks(model):
            router.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, router.gate.num_experts))
        model.save_pretrained(path)
        for f in (REPO / "assets" / asset).iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copy(f, path / f.name)
        if family == "glm4_moe":
            weights = load_file(path / "model.safetensors")
            g = torch.Generator().manual_seed(1)
            for name, shape in (("eh_proj.weight", (64, 128)), ("enorm.weight", (64,)), ("hnorm.weight", (64,))):
                weights[f"model.layers.{MTP_LAYER}.{name}"] = torch.randn(shape, generator=g).to(torch.bfloat16)
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        out[family] = path
    return out


def lora_model(family: str, lora_target: str = "all"):
    cfg = Config()
    cfg.method.lora_target = lora_target
    return lora.make_trainable(build(family), cfg)


def targeted(model) -> dict[str, set[str]]:
    """What carries LoRA (or trains in full next to it), by kind, as layer-free names."""
    out = {k: set() for k in lora_targets.KINDS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        layer = parts[parts.index("layers") + 1]
        if "lora_A" in parts or "lora_B" in parts:
            owner = ".".join(
                parts[parts.index("layers") + 2 : parts.index("lora_A" if "lora_A" in parts else "lora_B")]
            )
        else:
            owner = ".".join(parts[parts.index("layers") + 2 :])
        owner = owner.replace(".base_layer", "")
        kind = (
            "router" if "gate" in parts
            else "shared_experts" if "shared_experts" in parts
            else "experts" if "experts" in parts
            else "attention" if "self_attn" in parts
            else "mlp"
        )  # fmt: skip
        out[kind].add(f"{layer}:{owner}")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_all_adapts_every_linear_layer_and_the_routed_experts_but_not_the_router(family):
    model = lora_model(family)
    got = targeted(model)
    layers = ("0", "1", "2")
    assert got["attention"] == {f"{i}:self_attn.{n}" for i in layers for n in ATTENTION[family]}
    assert got["mlp"] == {f"0:mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}  # the dense first layer
    assert got["shared_experts"] == {
        f"{i}:mlp.shared_experts.{n}" for i in "12" for n in ("gate_proj", "up_proj", "down_proj")
    }
    # PEFT's ParamWrapper nests the second targeted parameter of a module inside the first.
    assert {x.split(":")[0] for x in got["experts"]} == {"1", "2"}
    assert got["router"] == set()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("indexer" in n for n in names)  # GLM-5's indexer gets no gradient through its top-k
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())  # a buffer, frozen
    cfg = model.peft_config["default"]
    assert sorted(cfg.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert "lm_head" not in str(cfg.target_modules)
    assert moe.describe(model).startswith("trainable by kind: attention")
    assert "frozen: router" in moe.describe(model)


def test_lora_kinds_choose_what_trains():
    only_attention = targeted(lora_model("glm4_moe", "attention"))
    assert only_attention["attention"] and not any(only_attention[k] for k in ("mlp", "shared_experts", "experts"))
    with_router = targeted(lora_model("glm4_moe", "all,router"))
    assert with_router["router"] == {
        "1:mlp.gate.modules_to_save.default.weight",
        "2:mlp.gate.modules_to_save.default.weight",
    }
    no_experts = targeted(lora_model("glm4_moe", "attention,mlp,shared_experts"))
    assert not no_experts["experts"] and no_experts["shared_experts"]


def test_lora_experts_on_a_dense_glm_says_what_the_model_has(pretrained_tiny):
    from transformers import AutoModelForCausalLM

    cfg = Config()
    cfg.method.lora_target = "experts"
    with pytest.raises(
        UserError, match="lora_target=experts: this model has nothing of that kind; it has: attention, mlp"
    ):
        lora.make_trainable(AutoModelForCausalLM.from_pretrained(pretrained_tiny), cfg)


def test_peft_would_rewrite_glm4_moe_targets_which_is_why_dist_glm_turns_that_off():
    """The upstream behaviour dist_glm works around (methods/lora_targets.native_targets): PEFT 0.21 turns
    gate_proj/up_proj/down_proj targets of a glm4_moe model into the fused expert parameters. If PEFT
    stops doing this, or moves the function, this test says so."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import transformers_weight_conversion

    assert callable(transformers_weight_conversion.convert_peft_config_for_transformers)
    model = build("glm4_moe")
    targets = lora_targets.peft_targets(model, "mlp")
    rewritten = get_peft_model(model, LoraConfig(target_modules=targets["target_modules"]))
    assert "gate_up_proj" in set(rewritten.peft_config["default"].target_parameters or ())
    kept = lora_model("glm4_moe", "mlp")
    assert not kept.peft_config["default"].target_parameters


def test_routing_counts_real_tokens_of_training_forwards_only():
    model = build("glm4_moe").train()
    stats = moe.RoutingStats(model)
    ids = torch.randint(0, 700, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # 4 padding positions
    stats.set_batch(mask)
    model(input_ids=ids)
    stats.set_batch(None)
    model(input_ids=ids)  # a forward outside set_batch (a gradient-checkpoint recompute): not counted
    model.eval()
    model(input_ids=ids)  # evaluation: not counted
    assert stats.counts.sum(dim=1).tolist() == [20 * 2, 20 * 2]  # 20 real tokens x top-2, per MoE layer
    metrics = stats.flush(lambda t: t)
    c = stats.counts
    assert c.sum() == 0  # reset for the next window
    assert set(metrics) >= {"routing/layer01/tokens_per_expert_cv", "routing/layer02/experts_without_tokens"}
    assert 0 < metrics["routing/layer01/mean_topk_score"] < 1
    assert (
        metrics["routing/layer01/tokens_per_expert_max"] >= 40 / 8 >= metrics["routing/layer01/tokens_per_expert_min"]
    )


@pytest.mark.parametrize("family", ["glm4_moe_lite", "glm_moe_dsa"])
def test_ptuning_on_multi_latent_attention_is_refused_up_front(family):
    from dist_glm.methods import ptuning

    cfg = Config()
    cfg.model.model_name_or_path = str(REPO / "assets" / FAMILIES[family])
    assert "multi-latent attention" in ptuning.check_config(cfg)[0]


def test_router_bias_moves_towards_balance_by_the_rate():
    model = build("glm4_moe").train()
    stats = moe.RoutingStats(model)
    stats.set_batch(torch.ones(2, 12, dtype=torch.bool))
    model(input_ids=torch.randint(0, 700, (2, 12)))
    stats.set_batch(None)
    load = stats.step_counts.clone()
    before = [r.e_score_correction_bias.clone() for r in stats.routers]
    stats.update_biases(0.01, lambda t: t)
    for router, old, counts in zip(stats.routers, before, load, strict=True):
        step = router.e_score_correction_bias - old
        assert torch.allclose(
            step, 0.01 * torch.sign(counts.mean() - counts).float()
        )  # under-loaded up, over-loaded down
    assert stats.step_counts.sum() == 0
    from dist_glm.methods import get_method

    model_cfg = Config().model
    model_cfg.model_name_or_path = str(REPO / "assets" / FAMILIES["glm4_moe"])
    assert "adapter does not save" in moe.check_router_bias_update(model_cfg, 0.01, get_method("lora"))[0]
    assert moe.check_router_bias_update(model_cfg, 0.01, get_method("full")) == []


def test_template_auto_picks_the_thinking_formats_and_glm5_next_is_refused_with_the_reason(tmp_path):
    from transformers import AutoTokenizer

    from dist_glm.data.template import choose_template

    tok = AutoTokenizer.from_pretrained(REPO / "assets" / FAMILIES["glm4_moe"])  # no chat_template: by model type
    assert choose_template("auto", tok, "glm4_moe") == "glm4_5"
    assert choose_template("auto", tok, "glm4_moe_lite") == choose_template("auto", tok, "glm_moe_dsa") == "glm4_7"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm5_next"}))
    cfg = Config()
    cfg.model.model_name_or_path = str(tmp_path)
    assert "multimodal" in moe.check_model(cfg.model)[0]


def test_exported_lora_merge_keeps_router_bias_and_mtp_layer_and_equals_the_adapter(moe_checkpoints, tmp_path):
    """LoRA on every kind, saved as dist_glm saves it; loaded by dist_glm's tools it gives the trained
    logits, and export's merge gives them as a plain model that still holds the checkpoint's router bias
    and, byte for byte, its MTP layer."""
    from transformers import AutoModelForCausalLM

    from dist_glm.models.artifacts import load_artifact, resolve_artifact, write_merged

    base = moe_checkpoints["glm4_moe"]
    cfg = Config()
    cfg.method.lora_target = "all"
    model = lora.make_trainable(AutoModelForCausalLM.from_pretrained(base), cfg)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    ids = torch.randint(0, 700, (1, 16))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    adapter = tmp_path / "adapter"
    with lora_targets.native_targets(model):
        model.save_pretrained(adapter)
    art = resolve_artifact(str(adapter), "")
    loaded = load_artifact(art, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    merged_dir = tmp_path / "merged"
    write_merged(art, "float32", merged_dir, trust_remote_code=False)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    bias = merged.model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(bias, torch.linspace(-0.05, 0.05, 8))
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    extra = {k for k, v in index["weight_map"].items() if v == moe.EXTRA_FILE}
    assert extra == {f"model.layers.{MTP_LAYER}.{n}" for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight")}
    with safe_open(str(base / "model.safetensors"), "pt") as a, safe_open(str(merged_dir / moe.EXTRA_FILE), "pt") as b:
        for k in extra:
            assert a.get_tensor(k).dtype == torch.bfloat16
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


# ---- real processes -------------------------------------------------------------------------------

STEPS = 6
TOL = 2e-5


def moe_args(out, data, checkpoint, **kw):
    settings = dict(
        model_name_or_path=checkpoint, train_from_scratch=False, template="auto", max_steps=STEPS,
        learning_rate=5e-3, cutoff_len=64, finetuning_type="full",
    )  # fmt: skip
    return base_args(out, data, **{**settings, **kw})


def routing(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("routing/")} for r in rows if "train/loss" in r}


def assert_same(got: dict, want: dict):
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.slow
def test_glm4_moe_full_same_losses_routing_and_export_on_1_and_2_ranks_zero3_eager(
    tmp_path, varlen_data, moe_checkpoints
):
    """1 rank x micro-batch 4 == 2 ranks x 2 under ZeRO-3 with the eager per-expert loop (ranks route to
    different experts: without leaf modules this hangs at step 1) == 1 rank x 2 x accumulation 2."""
    ckpt = moe_checkpoints["glm4_moe"]
    one, two, acc = tmp_path / "one", tmp_path / "two", tmp_path / "acc"
    bias = 0.01  # router_bias_update_rate: balanced from the global batch's counts, so the same on every split
    run_train(moe_args(one, varlen_data, ckpt, router_bias_update_rate=bias), nprocs=None)
    proc = run_train(
        moe_args(two, varlen_data, ckpt, per_device_train_batch_size=2, deepspeed="ds_configs/zero3.json",
                 experts_implementation="eager", router_bias_update_rate=bias),
        nprocs=2, timeout=300,
    )  # fmt: skip
    run_train(
        moe_args(acc, varlen_data, ckpt, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 router_bias_update_rate=bias),
        nprocs=1,
    )  # fmt: skip
    assert "ZeRO-3 leaf modules: Glm4MoeMoE" in proc.stdout
    assert "MTP" not in proc.stdout or "multi-token-prediction" in proc.stdout
    want = read_metrics(one, "train/loss")
    assert_same(read_metrics(two, "train/loss"), want)
    assert_same(read_metrics(acc, "train/loss"), want)
    assert want[STEPS] < want[1]
    # Routing is counted over the global batch: the same counts on 1 and 2 ranks.
    r1, r2 = routing(one), routing(two)
    assert r1[1]["routing/layer01/tokens_per_expert_max"] > 0
    for step in r1:
        for key, v in r1[step].items():
            assert r2[step][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (step, key)
    # The ZeRO-3 export equals the single-process one, keeps the router bias and carries the MTP layer.
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and "model.layers.1.mlp.gate.e_score_correction_bias" in a
    moved = a["model.layers.1.mlp.gate.e_score_correction_bias"] - torch.linspace(-0.05, 0.05, 8)
    assert moved.abs().max() > 0.005  # 6 steps of +-0.01 moved it
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3, msg=name)
    assert load_file(two / moe.EXTRA_FILE).keys() == {
        f"model.layers.{MTP_LAYER}.{n}" for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight")
    }


@pytest.mark.slow
def test_glm4_moe_lite_lora_on_experts_zero3_two_ranks_stopped_and_resumed_equals_one_rank(
    tmp_path, varlen_data, moe_checkpoints
):
    """LoRA on every kind (routed experts included) under ZeRO-3 on 2 ranks, stopped at step 3 and resumed:
    the loss curve of one uninterrupted process with the same global batch."""
    ckpt = moe_checkpoints["glm4_moe_lite"]
    common = dict(
        finetuning_type="lora", lora_target="all", learning_rate=2e-2, lr_scheduler_type="constant_with_warmup"
    )
    split, one = tmp_path / "split", tmp_path / "one"
    two_ranks = dict(common, deepspeed="ds_configs/zero3.json", per_device_train_batch_size=2, save_steps=3)
    proc = run_train(moe_args(split, varlen_data, ckpt, **two_ranks, max_steps=3), nprocs=2)
    assert ", experts " in proc.stdout.split("trainable by kind:")[1].split("\n")[0]
    run_train(moe_args(split, varlen_data, ckpt, **two_ranks, resume_from_checkpoint=split / "checkpoint-3"), nprocs=2)
    run_train(moe_args(one, varlen_data, ckpt, **common), nprocs=None)
    want = read_metrics(one, "train/loss")
    assert_same(read_metrics(split, "train/loss"), want)
    assert want[STEPS] < want[1]
    config = json.loads((split / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


@pytest.mark.slow
def test_glm4_moe_dpo_with_lora_on_experts_same_steps_on_1_and_2_zero3_ranks(tmp_path, moe_checkpoints):
    """Preference training on an MoE GLM: DPO with LoRA on every kind (routed experts included), the reference
    being the base with the adapter off, on 1 rank x 4 pairs and 2 ZeRO-3 ranks x 2 with the eager per-expert
    loop (leaf modules: the reference's no-grad forward routes too). Same losses and margins; routing is
    counted for the policy's forward only."""
    rows = [json.loads(x) for x in (REPO / "data" / "advertisegen_demo" / "train.jsonl").read_text().splitlines()]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["content"], "chosen": r["summary"],
                                         "rejected": rows[(i + 7) % 32]["summary"]}, ensure_ascii=False) + "\n"
                             for i, r in enumerate(rows[:32])), encoding="utf-8")  # fmt: skip
    common = dict(stage="dpo", finetuning_type="lora", lora_target="all", learning_rate=2e-2, pref_beta=0.5,
                  lr_scheduler_type="constant_with_warmup", max_steps=4, cutoff_len=96)  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    ckpt = moe_checkpoints["glm4_moe"]
    run_train(moe_args(one, pairs, ckpt, **common), nprocs=None)
    proc = run_train(
        moe_args(two, pairs, ckpt, **common, per_device_train_batch_size=2, deepspeed="ds_configs/zero3.json",
                 experts_implementation="eager"),
        nprocs=2, timeout=300,
    )  # fmt: skip
    assert "adapter switched off" in proc.stdout and "ZeRO-3 leaf modules: Glm4MoeMoE" in proc.stdout
    for key in ("train/loss", "train/rewards/margins"):
        want, got = read_metrics(one, key), read_metrics(two, key)
        assert sorted(got) == [1, 2, 3, 4] and max(abs(got[s] - want[s]) for s in want) < TOL, (key, got, want)
    loss = read_metrics(one, "train/loss")
    assert loss[1] == pytest.approx(0.6931472, abs=1e-5) and abs(loss[4] - loss[1]) > 1e-4
    assert routing(two)[1]["routing/layer01/tokens_per_expert_max"] > 0


@pytest.mark.slow
def test_glm_moe_dsa_full_zero2_two_ranks_match_one(tmp_path, varlen_data, moe_checkpoints):
    ckpt = moe_checkpoints["glm_moe_dsa"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(moe_args(one, varlen_data, ckpt), nprocs=None)
    run_train(
        moe_args(two, varlen_data, ckpt, per_device_train_batch_size=2, deepspeed="ds_configs/zero2.json"), nprocs=2
    )
    assert_same(read_metrics(two, "train/loss"), read_metrics(one, "train/loss"))


@pytest.mark.slow
def test_qlora_and_ptuning_train_a_glm4_moe(tmp_path, varlen_data, moe_checkpoints):
    ckpt = moe_checkpoints["glm4_moe"]
    for method in ("qlora", "ptuning"):
        out = tmp_path / method
        proc = run_train(moe_args(out, varlen_data, ckpt, finetuning_type=method, max_steps=2), nprocs=None)
        losses = read_metrics(out, "train/loss")
        assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values()), method
        if method == "qlora":
            assert "the routed experts (98,304 parameters) stay in torch.float32" in proc.stdout


def test_expert_parallel_is_refused_where_it_cannot_run(pretrained_tiny):
    from dist_glm.methods import get_method

    model = Config().model
    model.model_name_or_path = str(REPO / "assets" / FAMILIES["glm4_moe"])
    assert "adapters attach to" in moe.check_expert_parallel(model, 2, get_method("lora"))[0]
    assert "must divide the model's 8 routed experts" in moe.check_expert_parallel(model, 3, get_method("full"))[0]
    assert moe.check_expert_parallel(model, 2, get_method("full")) == []
    model.model_name_or_path = str(pretrained_tiny)
    assert "has no routed experts" in moe.check_expert_parallel(model, 2, get_method("full"))[0]


@pytest.mark.slow
def test_expert_parallel_two_ranks_matches_one_rank_resumes_and_exports(tmp_path, varlen_data, moe_checkpoints):
    """DeepSpeed AutoEP with 4 of the 8 experts on each of 2 ranks, under ZeRO-2, stopped at step 2 and
    resumed: the losses, routing metrics and final model of one process with the same global batch; the
    step-2 checkpoint exports to transformers' layout equal to the plain one. (ZeRO-0 and ZeRO-3 gave the
    same by hand, docs/moe.md; left out of CI for time.)"""
    ckpt = moe_checkpoints["glm4_moe"]
    common = dict(max_steps=4, lr_scheduler_type="constant_with_warmup", router_bias_update_rate=0.01)
    one, ep2 = tmp_path / "one", tmp_path / "ep_zero2"
    run_train(moe_args(one, varlen_data, ckpt, **common, save_steps=2), nprocs=None)
    ep = dict(common, per_device_train_batch_size=2, expert_parallel_size=2)
    z2 = dict(ep, deepspeed="ds_configs/zero2.json", save_steps=2)
    proc = run_train(moe_args(ep2, varlen_data, ckpt, **{**z2, "max_steps": 2}), nprocs=2)
    assert "expert parallelism: each rank holds 4 of them (DeepSpeed AutoEP over 2 ranks)" in proc.stdout
    run_train(moe_args(ep2, varlen_data, ckpt, **z2, resume_from_checkpoint=ep2 / "checkpoint-2"), nprocs=2)
    want, want_model = read_metrics(one, "train/loss"), load_file(one / "model.safetensors")
    for out in (ep2,):
        got = read_metrics(out, "train/loss")
        assert sorted(got) == [1, 2, 3, 4] and max(abs(got[s] - want[s]) for s in want) < TOL, (out.name, got, want)
        r1, r2 = routing(one), routing(out)
        assert all(r2[s][k] == pytest.approx(v, rel=1e-6) for s in r1 for k, v in r1[s].items())
        model = load_file(out / "model.safetensors")  # gathered back from the ranks' experts
        assert model.keys() == want_model.keys()
        for name in want_model:
            torch.testing.assert_close(model[name], want_model[name], atol=1e-4, rtol=1e-3, msg=name)
    # The step-2 checkpoints, exported: the expert-parallel one (its experts in 8 files) equals the plain one.
    exports = {}
    for name, ckpt_dir in (("ep", ep2 / "checkpoint-2"), ("one", one / "checkpoint-2")):
        proc = run_script(
            "export.py", [f"--model_name_or_path={ckpt_dir}", f"--export_dir={tmp_path / (name + '_export')}"]
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        exports[name] = {
            k: v for f in (tmp_path / (name + "_export")).glob("*.safetensors") for k, v in load_file(f).items()
        }
    assert exports["ep"].keys() == exports["one"].keys() >= want_model.keys()
    for name, value in exports["one"].items():
        torch.testing.assert_close(exports["ep"][name], value, atol=1e-4, rtol=1e-3, msg=name)


def test_chat_without_a_chat_template_says_where_to_get_it(moe_checkpoints):
    from dist_glm.models.artifacts import ModelArgs
    from dist_glm.tools.chat import ChatArgs, ChatSession

    with pytest.raises(UserError, match="has no chat_template; copy chat_template.jinja"):
        ChatSession(ModelArgs(model_name_or_path=str(moe_checkpoints["glm4_moe"])), ChatArgs())


@pytest.mark.slow
def test_planner_counts_active_parameters_and_plans_expert_parallelism():
    full = run_script(
        "plan.py",
        [
            "--model=GLM-4.5-Air",
            "--model_name_or_path=/models/GLM-4.5-Air",
            "--finetuning_type=full",
            "--bf16=true",
            "--num_gpus=32",
        ],
    )
    assert full.returncode == 0, full.stderr[-2000:]
    # GLM-4.5-Air: 106B parameters, 12B active (the model card; here with the embedding and head counted).
    assert "107B parameters (13.4B active per token: 128 routed experts, top-8;" in full.stdout
    ep_row = next(line for line in full.stdout.splitlines() if line.startswith("| zero2 + EP=32 |"))
    zero2_row = next(line for line in full.stdout.splitlines() if line.startswith("| zero2 |"))
    assert float(ep_row.split("|")[2]) < float(zero2_row.split("|")[2]) / 9  # 1/32 of the experts' weights
    lora = run_script(
        "plan.py",
        [
            "--model=GLM-4.7-Flash",
            "--model_name_or_path=/models/GLM-4.7-Flash",
            "--finetuning_type=lora",
            "--bf16=true",
            "--num_gpus=8",
        ],
    )
    assert lora.returncode == 0 and "EP=" not in lora.stdout  # adapters do not take expert parallelism
    assert "active per token: 64 routed experts, top-4" in lora.stdout


@pytest.mark.slow
def test_an_adapter_on_the_experts_continues_training(tmp_path, varlen_data, moe_checkpoints):
    """adapter_name_or_path= an MoE LoRA output: its saved targets (a pattern plus the experts' parameters)
    are adopted and the same adapter trains on, experts included."""
    ckpt = moe_checkpoints["glm4_moe"]
    first, second = tmp_path / "first", tmp_path / "second"
    run_train(moe_args(first, varlen_data, ckpt, finetuning_type="lora", max_steps=2), nprocs=None)
    proc = run_train(
        moe_args(second, varlen_data, ckpt, finetuning_type="lora", max_steps=2, adapter_name_or_path=first),
        nprocs=None,
    )
    assert "continuing the lora adapter" in proc.stdout and ", experts " in proc.stdout
    saved = json.loads((second / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    before, after = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if "experts" in k)

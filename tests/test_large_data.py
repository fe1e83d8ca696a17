"""Datasets larger than memory (issue 17): a large generated dataset tokenized by 2 workers, 2 ranks
starting from its warm cache without their memory growing with its size, a prepare killed while it
writes, and the losses and settings the cache must keep.

Already covered elsewhere: a changed file or cutoff_len re-tokenizes (test_formats
test_cache_is_reused_and_invalidated_by_a_changed_file), a truncated cache file is rebuilt
(test_a_half_written_cache_is_never_used), N workers give the same samples as one
(test_parallel_tokenization_gives_the_same_samples), prepare.py ahead of training means no
tokenization in the run (test_data_pipeline)."""

import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.data import run_measured, write_rows
from conftest import REPO, TINY_MODEL, base_args, child_env, launch_cmd
from dist_glm.config import load_config
from dist_glm.data.batching import GlobalBatchSampler, build_examples, collate, model_inputs
from dist_glm.data.preprocess import load_cache, tokenize_to_cache
from dist_glm.models.loading import load_tokenizer
from dist_glm.objectives.cross_entropy import token_loss_sum

# 200k rows, as the issue asks: tokenizing them with 2 workers costs about a minute of CPU here (~3,600
# rows per CPU second with the tiny tokenizer, measured by launch/benchmark_data.py).
LARGE_ROWS = 200_000
SMALL_ROWS = 500
# A rank that copies the dataset into Python lists holds ~2.4 KB more per row of these: measured +116
# and +124 MB (rank 0, 1) for 50k rows over 500 when train.py's `train_examples + [...]` materialised
# every row, so ~480 MB at 200k. What a rank legitimately holds per row is the offsets and lengths
# (~50 B/row, ~10 MB) and, until references are stored flat, the reply texts (~180 B/row, ~36 MB).
# Peak RSS of the same run on the same machine varies by about ±10 MB. 128 MB lies well above the
# second and well below the first.
RSS_MARGIN_MB = 128


def kill_prepare_mid_write(tmp_path, data, cache):
    """launch/prepare.py SIGKILLed while the second array of the cache is half written."""
    # tests/fault_injection: the first np.save of labels.npy writes half the array's bytes, leaves a
    # `.stalled` marker and sleeps, so the test kills the prepare provably mid-write.
    shim = os.pathsep.join([str(REPO / "tests" / "fault_injection"), os.environ.get("PYTHONPATH", "")])
    env = dict(child_env(), PYTHONPATH=shim, DIST_GLM_TEST_STALL_NPY="labels.npy")
    args = base_args(tmp_path / "killed", data, data_cache_dir=cache)
    proc = subprocess.Popen([sys.executable, "launch/prepare.py", *args], cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(cache.glob("*/labels.npy.stalled")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow
def test_two_ranks_start_from_a_large_warm_cache_with_the_memory_of_a_small_one(tmp_path):
    large = write_rows(tmp_path / "large.jsonl", LARGE_ROWS, seed=1)
    small = write_rows(tmp_path / "small.jsonl", SMALL_ROWS, seed=2)
    cache = tmp_path / "cache"
    env = child_env()
    args = base_args(tmp_path / "prep", large, data_cache_dir=cache, preprocessing_num_workers=2)
    prep = subprocess.run(
        [sys.executable, "launch/prepare.py", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert f"tokenized into {cache}" in prep.stdout and f"{LARGE_ROWS} rows -> {LARGE_ROWS} samples" in prep.stdout

    # The small dataset's prepare dies mid-write: what it leaves is a temporary directory only.
    kill_prepare_mid_write(tmp_path, small, cache)
    left = [p for p in cache.iterdir() if ".tmp" in p.name]
    assert len(left) == 1 and (left[0] / "input_ids.npy").exists() and not (left[0] / "manifest.json").exists()
    assert len(list(cache.iterdir())) == 2  # the large dataset's cache and that leftover: no cache for small

    runs = {}
    for name, data in (("small", small), ("large", large)):
        out = tmp_path / name
        cmd = launch_cmd(2) + base_args(out, data, data_cache_dir=cache, max_steps=2)
        runs[name] = run_measured(cmd, env, REPO, out / "metrics.jsonl", timeout=600)
        assert runs[name].returncode == 0, runs[name].output[-4000:]
    # The run after the killed prepare tokenized afresh rather than reading the leftover.
    assert f"tokenized into {cache}" in runs["small"].output and "reused cache" not in runs["small"].output
    assert "reused cache" in runs["large"].output and "tokenized into" not in runs["large"].output
    assert f"{LARGE_ROWS} train / 0 eval samples" in runs["large"].output
    small_rss, large_rss = runs["small"].peak_rss_mb, runs["large"].peak_rss_mb
    assert sorted(small_rss) == sorted(large_rss) == [0, 1], (small_rss, large_rss)
    print(f"peak RSS per rank: {SMALL_ROWS} rows {small_rss} MB, {LARGE_ROWS} rows {large_rss} MB")
    # Rank 0 of the small run also tokenized it (a few MB), which only loosens rank 0's bound.
    for rank in (0, 1):
        assert large_rss[rank] <= small_rss[rank] + RSS_MARGIN_MB, (
            f"rank {rank}: peak RSS {large_rss[rank]:.0f} MB with {LARGE_ROWS} rows vs {small_rss[rank]:.0f} MB "
            f"with {SMALL_ROWS}: memory grows with the dataset"
        )


def data_config(data, cache, **more):
    flags = [f"--{k}={v}" for k, v in {"data_cache_dir": cache, **more}.items()]
    return load_config(["--model_name_or_path=m", f"--dataset={data}", "--output_dir=o", *flags], None).data


@pytest.mark.slow
def test_losses_from_the_memory_mapped_cache_equal_the_in_memory_path(tmp_path):
    """A cache written by 2 forked workers and read through memory maps gives the training loop the
    same micro-batches, hence the same losses, as the examples built in memory by one process."""
    data = write_rows(tmp_path / "rows.jsonl", 64, seed=3)
    tok = load_tokenizer(str(TINY_MODEL))
    two = data_config(data, tmp_path / "cache", preprocessing_num_workers=2)
    path, tokenized = tokenize_to_cache(str(data), tok, str(TINY_MODEL), "glm4", two)
    assert tokenized
    cached, _ = load_cache(path)
    in_memory, _ = build_examples(str(data), tok, data_config(data, tmp_path / "unused"), "glm4")
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)).float().eval()
    sampler = GlobalBatchSampler(len(in_memory), micro_batch=4, grad_accum=2, world_size=2, seed=7)
    losses = {"cached": [], "in_memory": []}
    # One intra-op thread: on a busy 2-core machine two threads spin against each other and a forward of
    # the tiny model takes 20x longer (240 ms instead of 11 ms, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for step in range(sampler.steps_per_epoch + 1):  # one step into the second epoch too
                for rank in range(2):
                    for idx in sampler.micro_batches(step, rank):
                        for name, examples in (("cached", cached), ("in_memory", in_memory)):
                            batch = collate([examples[i] for i in idx], tok.pad_token_id)
                            loss_sum = token_loss_sum(model, model_inputs(batch), batch["labels"])[0]
                            losses[name].append(loss_sum.item())
    finally:
        torch.set_num_threads(threads)
    assert len(losses["cached"]) == 2 * 2 * (sampler.steps_per_epoch + 1)
    assert losses["cached"] == losses["in_memory"]


def test_changing_the_template_rebuilds_the_cache(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 8)
    tok = load_tokenizer(str(TINY_MODEL))
    cfg = data_config(data, tmp_path / "cache")
    first, tokenized = tokenize_to_cache(str(data), tok, str(TINY_MODEL), "glm4", cfg)
    assert tokenized
    other, tokenized = tokenize_to_cache(str(data), tok, str(TINY_MODEL), "glm4_0414", cfg)
    assert tokenized and other != first
    again, tokenized = tokenize_to_cache(str(data), tok, str(TINY_MODEL), "glm4", cfg)
    assert again == first and not tokenized
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([first.name, other.name])


def test_packing_lays_out_a_large_dataset_from_its_lengths_alone():
    """Packing 200k samples reads none of their tokens (the stand-in below fails on any row read, as a
    cache answers lengths from its offsets) and places every sample once, within the row size, in no
    more rows than first-fit decreasing guarantees (11/9 of the optimum + 1)."""
    import math
    import random

    from dist_glm.data.packing import pack_examples

    class LengthsOnly:
        def __init__(self, lengths):
            self._lengths = lengths

        def __len__(self):
            return len(self._lengths)

        def lengths(self):
            return self._lengths

        def __getitem__(self, i):
            raise AssertionError(f"packing read row {i}")

    rng = random.Random(0)
    lengths = [rng.randint(8, 96) for _ in range(200_000)]
    packed = pack_examples(LengthsOnly(lengths), 128)
    assert sorted(packed.members.tolist()) == list(range(len(lengths)))
    assert max(packed.lengths()) <= 128 and sum(packed.lengths()) == sum(lengths)
    assert len(packed) <= 11 / 9 * math.ceil(sum(lengths) / 128) + 1

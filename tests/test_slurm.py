"""The slurm/ templates on a real 2-node Slurm cluster (slurm/local_cluster/up.sh: slurmctld + two
slurmd on this machine): a 2-node job signalled the way Slurm warns before the time limit checkpoints,
requeues itself and finishes on the uninterrupted run's curve."""

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, base_args, child_env, read_metrics, run_train

STATE = "/tmp/dist_glm_slurm"


@pytest.fixture(scope="module")
def slurm_env():
    if (os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("slurmctld"))) and not os.environ.get(
        "DIST_GLM_REQUIRE_CLUSTER_TESTS"
    ):
        pytest.skip("the local Slurm cluster needs root (and apt-get to install slurm-wlm); CI runs this")
    up = subprocess.run(["bash", "slurm/local_cluster/up.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    env = dict(child_env(), SLURM_CONF=f"{STATE}/slurm.conf")
    yield env
    subprocess.run(["bash", "slurm/local_cluster/down.sh"], cwd=REPO, timeout=60)


def sbatch_cmd(template, args, log, wait=True) -> list[str]:
    # The templates ask for 8 GPUs per node; this cluster has CPUs only and no GRES: --gpus-per-node=0 is
    # the override docs/cluster.md gives for such clusters. One rank per node.
    cmd = ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    return cmd + [f"--output={log}", "--parsable"] + (["--wait"] if wait else []) + [f"slurm/{template}", *args]


def sbatch(env, template, args, log, wait=True):
    return subprocess.run(
        sbatch_cmd(template, args, log, wait), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


# States a job never leaves. A requeued job passes through REQUEUED / COMPLETING / PENDING, which are not.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(env, job_id) -> str:
    """The job's state as slurmctld has it, "" while that cannot be told. `-t all` because plain squeue
    hides some states, and a failed query (slurmctld busy on a loaded machine: "Socket timed out") is an
    unknown state, never an ended job."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    if r.returncode != 0 and "Invalid job id" in r.stderr:
        return "PURGED"  # ended longer ago than MinJobAge
    return r.stdout.strip() if r.returncode == 0 else ""


def job_gone(env, job_id) -> bool:
    # Asked twice a second apart: an ended job stays ended, a transition does not repeat.
    if job_state(env, job_id) not in FINAL_STATES | {"PURGED"}:
        return False
    time.sleep(1)
    return job_state(env, job_id) in FINAL_STATES | {"PURGED"}


# What a template may change of full_ft.sh: its comments, the job's name, the signal's lead time and the method.
# Everything else (the launch itself) is common.sh, which the 2-node job below runs.
OWN_LINES = re.compile(r"^(# .*|#SBATCH --job-name=.*|#SBATCH --signal=USR1@\d+ .*|METHOD_ARGS=.*)$")


def test_every_template_is_full_ft_with_another_method():
    """The 2-node job below runs full_ft.sh; the other templates differ from it in the method only, so
    that job covers their launch too (a LoRA cell on the cluster cost 42 s of CI for no other line)."""
    from dist_glm.methods import METHODS

    reference = (REPO / "slurm" / "full_ft.sh").read_text().splitlines()
    templates = sorted(p for p in (REPO / "slurm").glob("*.sh") if p.name != "common.sh")
    assert {p.name for p in templates} == {"full_ft.sh", "lora.sh", "qlora.sh", "ptuning.sh"}
    for path in templates:
        lines = path.read_text().splitlines()
        for ours, theirs in zip(lines, reference, strict=True):
            assert ours == theirs or (OWN_LINES.match(ours) and OWN_LINES.match(theirs)), (path.name, ours)
        method = re.search(r'^METHOD_ARGS="--finetuning_type=(\w+)"', path.read_text(), re.M).group(1)
        assert method in METHODS and method in path.name.replace("full_ft", "full"), (path.name, method)
        assert lines[-1] == 'source "${DIST_GLM_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"', path.name


@pytest.mark.slow
def test_two_node_job_signalled_before_its_time_limit_requeues_and_stays_on_the_curve(slurm_env, tmp_path, varlen_data):
    """One job covers the templates' launch on 2 nodes and their preemption: the uninterrupted 2-rank run is the
    reference, which equals a single process under every ZeRO stage (test_zero_equivalence; a ZeRO-3 job here
    doubled this test's time for no Slurm-specific line)."""
    common = dict(max_steps=40, save_steps=0, lr_scheduler_type="constant_with_warmup", per_device_train_batch_size=2)
    straight, job_dir, log = tmp_path / "straight", tmp_path / "job", tmp_path / "job.log"
    args = [a for a in base_args(job_dir, varlen_data, **common) if not a.startswith("--finetuning_type")]
    args.append("--disable_tqdm=false")  # a log file gets plain progress lines
    job_id = sbatch(slurm_env, "full_ft.sh", args, log, wait=False).stdout.strip().split(";")[0]
    assert job_id.isdigit(), job_id
    deadline = time.time() + 300
    while not (job_dir / "metrics.jsonl").exists() or len((job_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline, log.read_text() if log.exists() else "job never started"
        time.sleep(0.5)
    # What `#SBATCH --signal=USR1@180` does before the limit: USR1 to every task of the job step.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_env, check=True)
    # The uninterrupted reference runs while the job saves, waits to be requeued and starts again: that
    # wait is idle time on this machine (it cost CI ~30 s when the reference ran first).
    reference = ThreadPoolExecutor(1).submit(run_train, base_args(straight, varlen_data, **common), nprocs=2)
    deadline = time.time() + 600

    def restarted_and_finished() -> bool:
        # Read from the job's own log, not from squeue: right after `scontrol requeue` a loaded slurmctld
        # may show the job as COMPLETED for a while before it turns PENDING again (CI saw it as gone).
        text = log.read_text() if log.exists() else ""
        restart = text.find("restart 1")
        return restart >= 0 and "[slurm] training exited with code" in text[restart:]

    gone_since, hurried = None, False
    while not (restarted_and_finished() and job_gone(slurm_env, job_id)):
        assert time.time() < deadline, log.read_text()[-4000:]
        # Slurm defers a requeued job's start (BeginTime) by a couple of minutes; here, a few seconds. Not
        # "now": slurmd refuses a batch job whose credential is no newer (to the second) than the one it
        # revoked when the requeue killed the first run ("Job credential revoked"), and the job then ends
        # for good. CI once lost that race; 10 s is far past it.
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T %r"], env=slurm_env, capture_output=True, text=True
        )
        if state.stdout.split()[:2] == ["PENDING", "BeginTime"] and not hurried:
            # Once: asked again each second, "now+10" would keep moving the start away.
            hurried = (
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+10"], env=slurm_env).returncode
                == 0
            )
        # Ended without a second run: fail now with the log, not at the deadline. A grace period, because
        # a loaded slurmctld may show a requeued job as ended for a while before it turns PENDING.
        if not restarted_and_finished() and job_gone(slurm_env, job_id):
            gone_since = gone_since or time.time()
            assert time.time() - gone_since < 60, "the job ended without a second run:\n" + log.read_text()[-4000:]
        else:
            gone_since = None
        time.sleep(1)
    reference.result(timeout=600)
    text = log.read_text()
    assert "preempted; checkpoint saved; requeueing" in text and "restart 1" in text, text[-4000:]
    assert "nodes node[1-2] (2), 2 ranks" in text, text[-3000:]
    # A log file gets plain progress lines, not tqdm's carriage-return bar.
    assert "[dist_glm] step 40/40 (100%)" in text and "\r" not in text, text[-3000:]
    a, b = read_metrics(straight, "train/loss"), read_metrics(job_dir, "train/loss")
    assert sorted(b) == list(range(1, 41)) and max(abs(a[s] - b[s]) for s in a) < 1e-6

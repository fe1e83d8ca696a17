"""Nothing a user made is lost: export stages in a fresh directory of its own and deletes nothing it did
not create (its own input named `<export_dir>.tmp`, an unrelated `<export_dir>.tmp`), a failed export
leaves the previous one whole; a training run refuses an output_dir that is, contains or lies inside what
it reads, refuses to discard trained weights for train_from_scratch, and never deletes a checkpoint-like
directory it did not write."""

from pathlib import Path

import pytest

from dist_glm.config import load_config
from dist_glm.errors import UserError
from dist_glm.models.artifacts import ModelArgs
from dist_glm.runtime.staging import staged
from dist_glm.tools.export import ExportArgs, export
from dist_glm.training.checks import validate_inputs
from tests.conftest import REPO, TINY_MODEL


def saved_model(path: Path) -> Path:
    """The tiny GLM with (random) weights, plus a file of the user's that no tool may lose."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(path)
    (path / "my_notes.txt").write_text("keep")
    return path


def contents(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_export_never_deletes_its_own_input_named_like_its_staging_dir(tmp_path):
    # The input is `exp/m.tmp`, the export `exp/m`: a fixed staging name `<export_dir>.tmp` was that input.
    src = saved_model(tmp_path / "exp" / "m.tmp")
    before = contents(src)
    out = export(ModelArgs(model_name_or_path=str(src)), ExportArgs(export_dir=str(tmp_path / "exp" / "m")))
    assert contents(src) == before
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # Readable by others, as the umask says (transformers writes the weights 0600; the staging dir is 0700).
    assert out.stat().st_mode & 0o777 == 0o755 and (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["m", "m.tmp"]  # no staging left behind


def test_export_leaves_an_unrelated_tmp_directory_alone(tmp_path):
    src = saved_model(tmp_path / "model")
    unrelated = tmp_path / "exp" / "x.tmp"
    unrelated.mkdir(parents=True)
    (unrelated / "keep.txt").write_text("keep")
    export(ModelArgs(model_name_or_path=str(src)), ExportArgs(export_dir=str(tmp_path / "exp" / "x")))
    assert (unrelated / "keep.txt").read_text() == "keep"


def test_a_failed_export_leaves_the_previous_export_whole_and_no_staging(tmp_path, monkeypatch):
    src = saved_model(tmp_path / "model")
    out = tmp_path / "exp"
    export(ModelArgs(model_name_or_path=str(src)), ExportArgs(export_dir=str(out)))
    first = contents(out)

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    with pytest.raises(OSError):
        export(ModelArgs(model_name_or_path=str(src)), ExportArgs(export_dir=str(out), overwrite_export_dir=True))
    assert contents(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "model"]


def test_a_bad_shard_size_is_refused_before_anything_is_written(tmp_path):
    src = saved_model(tmp_path / "model")
    with pytest.raises(UserError, match=r"max_shard_size='banana' is not a size; use a whole number with a unit"):
        export(
            ModelArgs(model_name_or_path=str(src)), ExportArgs(export_dir=str(tmp_path / "e"), max_shard_size="banana")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staging_swaps_in_only_when_complete(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), staged(target) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("killed mid-write")
    assert contents(target) == {"old": b"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    with staged(target) as tmp:
        (tmp / "new").write_text("new")
    assert contents(target) == {"new": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def recipe(*args: str):
    return load_config(["configs/demo.yaml", *args])


def problems_of(cfg) -> list[str]:
    with pytest.raises(UserError) as err:
        validate_inputs(cfg, world_size=1)
    return err.value.problems


def test_continuing_the_demo_as_the_docs_say_refuses_to_overwrite_the_model_it_reads(tmp_path, monkeypatch):
    # docs/continued.md's command with the shipped recipe: output_dir out/demo (the recipe's), the model
    # out/demo, train_from_scratch: true and overwrite_output_dir: true left as the recipe has them.
    monkeypatch.chdir(tmp_path)
    for name in ("configs", "data", "assets", "ds_configs"):
        (tmp_path / name).symlink_to(REPO / name)
    trained = saved_model(tmp_path / "out" / "demo")
    before = contents(trained)
    problems = problems_of(recipe("--model_name_or_path=out/demo"))
    assert any(p.startswith("output_dir='out/demo' is model_name_or_path='out/demo'") for p in problems), problems
    assert any(p.startswith("train_from_scratch=true would discard the trained weights") for p in problems), problems
    assert contents(trained) == before
    # As documented now: a new output_dir and train_from_scratch=false.
    ok = recipe("--model_name_or_path=out/demo", "--output_dir=out/demo2", "--train_from_scratch=false")
    validate_inputs(ok, world_size=1)


@pytest.mark.parametrize("where", ["inside", "contains"])
def test_output_dir_may_not_overlap_any_input(tmp_path, where):
    model = saved_model(tmp_path / "runs" / "model")
    out = model / "continued" if where == "inside" else tmp_path / "runs"
    problems = problems_of(recipe(f"--model_name_or_path={model}", f"--output_dir={out}", "--train_from_scratch=false"))
    word = "lies inside" if where == "inside" else "contains"
    assert any(f"{word} model_name_or_path='{model}'" in p for p in problems), problems


def test_teacher_and_init_checkpoint_count_as_inputs(tmp_path):
    teacher = saved_model(tmp_path / "teacher")
    problems = problems_of(recipe(f"--teacher_model_name_or_path={teacher}", f"--output_dir={teacher}"))
    assert any(f"is teacher_model_name_or_path='{teacher}'" in p for p in problems), problems
    ckpt = tmp_path / "run1" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    problems = problems_of(recipe(f"--init_from_checkpoint={ckpt}", f"--output_dir={tmp_path / 'run1'}"))
    assert any(f"contains init_from_checkpoint='{ckpt}'" in p for p in problems), problems


def test_a_checkpoint_like_directory_dist_glm_did_not_write_is_never_deleted(tmp_path):
    from dist_glm.checkpointing import checkpoints

    out = tmp_path / "out"
    foreign = out / "checkpoint-4.tmp"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("keep")
    assert not checkpoints.is_ours(foreign)
    problems = problems_of(recipe(f"--output_dir={out}"))
    assert any("'checkpoint-4.tmp' was not written by dist_glm" in p for p in problems), problems
    ours = out / "checkpoint-6.tmp"
    ours.mkdir()
    (ours / checkpoints.OURS_FILE).write_text("")
    assert checkpoints.is_ours(ours)
    (problem,) = checkpoints.foreign_leftovers(str(out))  # ours is a leftover a save may replace; the other not
    assert problem.startswith(f"output_dir='{out}': 'checkpoint-4.tmp'")
    assert (foreign / "thesis.tex").read_text() == "keep"


def test_a_config_dist_glm_saved_reads_back_as_it_was_written(tmp_path):
    # save_config writes every key, quantization_bit: 4 among them; read back, a LoRA or full run's config
    # must stay what it was (not LLaMA-Factory's QLoRA spelling), or checkpoints would load as QLoRA.
    from dist_glm.config import save_config

    for method in ("lora", "full", "freeze", "ptuning", "qlora"):
        cfg = recipe(f"--finetuning_type={method}")
        save_config(cfg, tmp_path / "config.yaml")
        again = load_config([str(tmp_path / "config.yaml")], default_yaml=None)
        assert again.method.finetuning_type == method and again.to_flat_dict() == cfg.to_flat_dict()


def test_another_trainers_checkpoints_are_never_ours(tmp_path):
    # HF Trainer's and LLaMA-Factory's checkpoint-N directories also hold a trainer_state.json.
    from dist_glm.checkpointing import checkpoints

    out = tmp_path / "out"
    theirs = out / "checkpoint-500"
    theirs.mkdir(parents=True)
    (theirs / "trainer_state.json").write_text('{"global_step": 500}')
    assert not checkpoints.is_ours(theirs) and checkpoints.list_checkpoints(str(out)) == []
    problems = problems_of(recipe(f"--output_dir={out}"))
    assert any("'checkpoint-500' was not written by dist_glm" in p for p in problems), problems
    assert (theirs / "trainer_state.json").is_file()


def test_evaluate_never_writes_into_a_model_dist_glm_did_not_train(pretrained_tiny, eval_data):
    """<model>/eval is the default only for dist_glm's own outputs (they hold config.yaml); a downloaded model
    gets nothing written into it: output_dir is asked for before anything loads."""
    from dist_glm.config import DataConfig
    from dist_glm.models.artifacts import ModelArgs
    from dist_glm.tools.evaluate import EvaluateArgs, evaluate_artifact

    before = sorted(p.name for p in pretrained_tiny.iterdir())
    with pytest.raises(UserError, match=r"output_dir is required here: .* is not a dist_glm training output"):
        evaluate_artifact(
            ModelArgs(model_name_or_path=str(pretrained_tiny)), EvaluateArgs(), DataConfig(eval_dataset=str(eval_data))
        )
    assert sorted(p.name for p in pretrained_tiny.iterdir()) == before

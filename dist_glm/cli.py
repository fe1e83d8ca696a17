"""Entry points shared by launch/*.py and the console scripts in setup.py."""

import sys

from dist_glm.errors import UserError, report_and_exit


def train_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from dist_glm import config

    if "-h" in argv or "--help" in argv:
        print(config.help_text())
        return
    from dist_glm.distributed import destroy, quiet_other_ranks, use_cpu_accelerator_if_no_gpu
    from dist_glm.preemption import PREEMPTED_EXIT, Preempted

    use_cpu_accelerator_if_no_gpu()
    quiet_other_ranks()
    try:
        cfg = config.load_config(argv)
        from dist_glm.train import train

        train(cfg)
    except UserError as err:
        report_and_exit(err, prog="train.py")
    except Preempted:  # the checkpoint is complete on every rank; the scheduler should requeue
        sys.exit(PREEMPTED_EXIT)
    finally:
        destroy()


def prepare_main(argv: list[str] | None = None) -> None:
    """Tokenize `dataset` and `eval_dataset` of a recipe into the shared cache, without training."""
    argv = sys.argv[1:] if argv is None else argv
    from dist_glm import config

    if "-h" in argv or "--help" in argv:
        print(config.help_text().replace("train.py", "prepare.py"))
        return
    try:
        cfg = config.load_config(argv)
        from dist_glm.data.formats import check_data_paths
        from dist_glm.models import load_tokenizer
        from dist_glm.train import load_data

        problems = check_data_paths(cfg.data.dataset, "dataset") + check_data_paths(
            cfg.data.eval_dataset, "eval_dataset"
        )
        if problems:
            raise UserError(problems)
        load_data(cfg, load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code))
    except UserError as err:
        report_and_exit(err, prog="prepare.py")

"""The `megarope` command's own helpers; each subcommand is tested with its module (test_train.py, ...)."""

import os

from megarope.cli import launch_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "examples", "toy_cpu.yaml")
EXPERIMENT = os.path.join(REPO, "examples", "experiment_smollm2_135m.yaml")


def test_the_slurm_launch_check_names_each_commands_directory_and_environment(tmp_path, capsys, monkeypatch):
    """What launch/slurm.sbatch reads before any rank starts: the directory it watches and megatron's environment
    for the layout, or one line and 2."""
    monkeypatch.chdir(tmp_path)
    cases = [(["train", TOY, "checkpoint.dir=ck", "parallel.cp=2", "--no-progress"], "ck", True),
             (["train", TOY], "runs/toy", False),
             (["experiment", EXPERIMENT, "out=exp"], "exp", False),
             (["eval", "--checkpoint", "c", "--data", "d", "--lengths", "1K", "--tp", "2", "--out", "o"], "o", True)]
    for argv, directory, sets_connections in cases:
        assert launch_check(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == str(tmp_path / directory), argv
        assert (lines[1:] == ["CUDA_DEVICE_MAX_CONNECTIONS=1"]) == sets_connections, (argv, lines)
    for argv, words in ((["train", "absent.yaml"], "config file not found: absent.yaml"),
                        (["experiment", EXPERIMENT, "tune.bases=[500, 500]"], "a base is given twice"),
                        (["eval", "--cp", "2"], "the following arguments are required")):
        assert launch_check(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and words in captured.err, captured.err

"""The ``n2n`` command line: bad input exits 2 with one line before any Ray work; ``teacher`` works."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from envs.checkpoint import load_checkpoint
from pipeline.cli.main import build_parser, main
from pipeline.config.flags import overrides as flag_overrides

REPO = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Runs ``n2n`` in this process; returns (exit code, stderr)."""
    import ray

    ray_before = ray.is_initialized()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    if not ray_before:
        assert not ray.is_initialized(), "Ray was started for a command that should fail first"
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--set", "removal.iterations=0"], "'removal.iterations'"),
        (["run", "--set", "removal.iteratoins=3"], "'removal.iteratoins' is unknown"),
        (["run", "--set", "shrinkage.ratios=[0.5, 2]"], "'shrinkage.ratios.1'"),
        (["run", "--set", "removal.iterations"], "section.key=value"),
        (["run", "--iterations", "0"], "'removal.iterations'"),
        (["run", "--preset", "dmeo"], "unknown preset 'dmeo'"),
        (["run", "--skip-removal", "--skip-shrinkage"], "enable at least one stage"),
        (
            ["run", "--set", "search.evaluator=nowhere:Nothing"],
            "search.evaluator 'nowhere:Nothing'",
        ),
        (
            ["run", "--set", "teacher.checkpoint=/nonexistent/teacher"],
            "teacher.checkpoint /nonexistent/teacher",
        ),
        (
            ["run", "--set", "data.name=fashion-mnist", "--set", "data.root=/nonexistent/fm"],
            "/nonexistent/fm",
        ),
        (["run", "--no-tracking", "--resume", "/nonexistent/run"], "no config.yaml"),
        (["sweep", "--no-tracking"], "needs sweep.grid"),
        (["sweep", "--grid", "distill.steps=10,20"], "cannot vary in a sweep"),
        (["sweep", "--grid", "seed"], "--grid 'seed' must look like key=v1,v2"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, expected, capsys, tmp_path: Path) -> None:
    argv = [*argv, "--run-dir", str(tmp_path / "run")] if "--resume" not in argv else argv
    code, err = run_cli(argv, capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"n2n {argv[0]}: error:") and expected in line, line


def test_argparse_errors_exit_2(capsys) -> None:
    code, err = run_cli(["run", "--algo", "a3c"], capsys)
    assert code == 2 and "invalid choice: 'a3c'" in err
    code, _ = run_cli(["frobnicate"], capsys)
    assert code == 2


def test_an_occupied_run_dir_or_a_changed_resume_is_refused(capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "children.csv").write_text("stage\n")
    code, err = run_cli(["run", "--no-tracking", "--run-dir", str(run_dir)], capsys)
    assert code == 2 and f"--resume {run_dir}" in one_line(err)
    (run_dir / "config.yaml").write_text("name: demo\n")
    code, err = run_cli(["run", "--resume", str(run_dir), "--set", "removal.iterations=9"], capsys)
    assert code == 2 and "drop --set" in one_line(err)
    code, err = run_cli(["run", "--resume", str(run_dir), "--algo", "random"], capsys)
    assert code == 2 and "drop --algo" in one_line(err)


def test_unreachable_mlflow_server_fails_before_ray(capsys, tmp_path: Path) -> None:
    code, err = run_cli(
        ["run", "--run-dir", str(tmp_path / "run"), "--tracking-uri", "http://127.0.0.1:9"], capsys
    )
    assert code == 2 and "127.0.0.1:9" in one_line(err)


def test_a_separate_process_fails_fast_without_starting_ray(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--set", "search.algo=a3c", "--run-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("n2n run: error: config key 'search.algo'")
    assert "Ray" not in proc.stderr and "ray" not in proc.stdout
    assert time.monotonic() - started < 30
    assert not (tmp_path / "config.yaml").exists()


def test_flags_stand_for_config_overrides() -> None:
    args = build_parser().parse_args(
        ["run", "--algo", "appo", "--iterations", "3", "--episodes", "2", "--seed", "7",
         "--address", "auto", "--no-tracking", "--skip-shrinkage", "--env-runners", "2"]
    )  # fmt: skip
    assert set(flag_overrides(args)) == {
        "search.algo=appo", "removal.iterations=3", "shrinkage.iterations=3",
        "removal.episodes_per_iteration=2", "shrinkage.episodes_per_iteration=2", "seed=7",
        "ray.address=auto", "tracking.enabled=false", "shrinkage.enabled=false",
        "search.env_runners=2",
    }  # fmt: skip


def test_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("run", "teacher", "sweep"))


def test_teacher_command_trains_and_saves_a_checkpoint(capsys, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    code = main(
        [
            "teacher",
            "--set",
            "teacher.epochs=2",
            "--set",
            "teacher.width=0.25",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    ckpt = load_checkpoint(out, num_classes=10)
    assert ckpt.spec["base"]["arch"] == "small_cnn" and ckpt.spec["base"]["input_shape"] == [
        1,
        8,
        8,
    ]
    assert 0.1 < ckpt.metrics["val_accuracy"] <= 1.0
    code, err = run_cli(["teacher", "--out", str(out)], capsys)
    assert code == 2 and "already holds a teacher" in one_line(err)


def test_resuming_a_finished_run_prints_its_summary_without_ray(capsys, tmp_path: Path) -> None:
    from pipeline.config.presets import load_config
    from pipeline.tracking.rundir import RunDir

    elsewhere = tmp_path / "moved-from"
    run = RunDir(tmp_path / "run")
    run.write_config(load_config("demo", [f"output.run_dir={elsewhere}"]).resolve_paths().to_yaml())
    run.mark("finetune", students=1)
    facts = {
        "params": 1000,
        "flops": 5000,
        "size_bytes": 4000,
        "val_accuracy": 0.9,
        "test_accuracy": 0.8,
    }
    student = {**facts, "params": 100, "rank": 1, "best": True}
    run.write_summary({"name": "demo", "teacher": facts, "student": student, "students": [student]})
    import ray

    ray_before = ray.is_initialized()
    assert main(["run", "--resume", str(run.path), "--no-tracking"]) == 0
    assert ray.is_initialized() == ray_before
    out = capsys.readouterr().out
    assert "10.0x" in out and f"run directory: {run.path}" in out

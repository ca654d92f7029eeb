"""The ``n2n`` command line: bad input exits 2 with one line before any Ray work; ``teacher`` works."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envs.checkpoint import load_checkpoint
from pipeline.cli.main import build_parser, main
from pipeline.config.exits import MEANINGS
from pipeline.config.flags import FLAGS, forwarded
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


# --------------------------------------------------------------------------- one flag table


def _options(parser: argparse.ArgumentParser, skip_groups: tuple[str, ...] = ()) -> set[str]:
    """The long options of a (sub)parser, but for --help and the groups named."""
    skipped = {
        id(a) for g in parser._action_groups if g.title in skip_groups for a in g._group_actions
    }
    return {
        max(action.option_strings, key=len)
        for action in parser._actions
        if action.option_strings and id(action) not in skipped and action.dest != "help"
    }


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_run_flag_is_in_the_one_flag_table() -> None:
    """``n2n run`` and ``n2n submit`` (but for its target's own options) take exactly the
    table's flags: a flag added to a parser by hand and not to the table fails here."""
    table = {flag.name for flag in FLAGS}
    subs = _subparsers()
    run = _options(subs["run"])
    assert run == {f.name for f in FLAGS if "run" in f.commands}
    assert run <= table
    submit = _options(subs["submit"], skip_groups=("target", "--k8s"))
    assert submit == {f.name for f in FLAGS if "submit" in f.commands} - {"--address"}
    for name in ("teacher", "baseline", "sweep"):
        own = {"teacher": {"--out"}, "sweep": {"--grid"}}.get(name, set())
        assert _options(subs[name]) - own == {f.name for f in FLAGS if name in f.commands}, name


def test_every_flag_sets_keys_the_config_has() -> None:
    """Each key in the table is a real config key (an override of it validates)."""
    from pipeline.config.presets import load_config

    samples = {int: "1", str: "auto", float: "10"}
    # Keys that are only valid with another one set (the schema checks the pair).
    companions = {"search.freeze_policy": ["search.policy_from=runs/source"]}
    for flag in FLAGS:
        for key in flag.keys:
            if flag.type is None:
                value = flag.value
            elif flag.repeat:
                value = "[1000]"
            elif key in ("search.algo", "search.policy"):
                value = flag.choices[0]
            else:
                value = samples[flag.type]
            # raises ConfigError naming an unknown key
            load_config("demo", [f"{key}={value}", *companions.get(key, [])])


def test_submit_passes_the_forwarded_flags_on_as_given(tmp_path: Path) -> None:
    from pipeline.cluster.submit import job_command
    from pipeline.config.flags import config_from_args

    argv = ["submit", "--address", "http://127.0.0.1:8265", "--algo", "random", "--seed", "3",
            "--skip-shrinkage", "--iterations", "2", "--set", "distill.steps=5",
            "--run-dir", str(tmp_path / "r"), "--no-tracking"]  # fmt: skip
    args = build_parser().parse_args(argv)
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "address": None}))
    command = job_command(args, cfg, preset=None)
    assert forwarded(args) == ["--seed", "3", "--algo", "random", "--iterations", "2",
                               "--skip-shrinkage"]  # fmt: skip
    assert command[:4] == ["python", "-m", "pipeline", "run"]
    joined = " ".join(command)
    for part in ("--set distill.steps=5", "--seed 3", "--algo random", "--iterations 2",
                 "--skip-shrinkage", f"--run-dir {tmp_path / 'r'}", "--no-tracking"):  # fmt: skip
        assert part in joined, (part, joined)
    assert command[-2:] == ["--address", "auto"]


def test_every_command_lists_its_exit_codes(capsys) -> None:
    for name in ("run", "submit"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for code, meaning in MEANINGS[name].items():
            assert f"{int(code)} {' '.join(meaning.split())}" in out, (name, code)


def test_the_final_table_is_whole_off_a_terminal(tmp_path: Path) -> None:
    """Written to a file or a log, the summary table keeps every digit (no 80-column squeeze)."""
    from pipeline.tracking.tables import console, summary_table

    teacher = {"params": 11_173_962, "flops": 1_113_878_528, "size_bytes": 44_775_568,
               "val_accuracy": 0.9512, "test_accuracy": 0.9499}  # fmt: skip
    student = {**teacher, "params": 4_999_999, "flops": 499_999_999, "rank": 1, "best": True}
    summary = {"name": "a-rather-long-run-name-for-a-cifar10-resnet18-search", "teacher": teacher,
               "students": [student]}  # fmt: skip
    path = tmp_path / "out.log"
    with path.open("w") as fh:
        console(fh).print(summary_table(summary))
    text = path.read_text()
    assert "499,999,999" in text and "1,113,878,528" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) > 80  # not squeezed into 80 columns
    assert len({len(line) for line in text.splitlines()[1:]}) == 1  # rows of one width


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_non_editable_install_runs_the_demo(tmp_path: Path) -> None:
    """``pip install .`` (not editable) into a fresh venv: the ``n2n`` script, ``python -m
    pipeline`` and the packaged presets work from anywhere. The venv borrows this one's
    dependencies through a .pth file (installing torch and Ray again would take minutes and
    gigabytes); n2n itself is the wheel's copy, the checkout is not on its path."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import pipeline, pipeline.config.presets as p; print(pipeline.__file__); "
         "print(sorted(p.presets()))"],
        capture_output=True, text=True, cwd=work, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert where[0].startswith(site), where  # the installed copy, not the checkout
    assert "demo" in where[1] and "fashion-mnist-resnet18" in where[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run(
        [venv / "bin" / "n2n", "run", "--preset", "demo", "--set", "removal.iterations=1",
         "--set", "shrinkage.iterations=1"],
        capture_output=True, text=True, cwd=work, timeout=480, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "best" in run.stdout and "run directory:" in run.stdout
    help_ = subprocess.run([python, "-m", "pipeline", "--help"], capture_output=True, text=True,
                           cwd=work)  # fmt: skip
    assert help_.returncode == 0 and "submit" in help_.stdout

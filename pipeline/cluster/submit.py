"""``n2n submit``: ``n2n run`` as a Ray job on a cluster, followed to its end.

Two targets, one flow: the config is loaded and checked here first (bad input exits 2 with one
line, as ``n2n run`` does, and nothing is sent), the job gets a command line whose paths outlive
it, its logs are streamed to stdout, and the exit code is the job's outcome:

- ``--address http://HEAD:8265``: Ray's job server (``JobSubmissionClient``). This checkout is
  uploaded as the job's ``working_dir`` (venvs, data, runs, MLflow stores and VCS folders left
  out) and the entrypoint is ``python -m pipeline run ... --address auto`` with the run
  directory and a SQLite tracking URI made absolute here, so results land where a local
  ``n2n run`` puts them, not in Ray's temporary copy of the working dir. Ray's token
  (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, Ray's own
  order) is sent when there is one, whatever ``RAY_AUTH_MODE`` says.
- ``--k8s``: a KubeRay RayJob and a ConfigMap with the validated config (``pipeline.cluster.kuberay``).

Exit codes (``pipeline.config.exits``): 0 the job SUCCEEDED (or ``--no-wait``/``--dry-run``/``--delete``
did their part); 1 the job FAILED; 2 nothing was started (bad input, no token, cluster not
reachable); 3 the job was STOPPED or deleted by someone else; 4 the deadline passed (``--deadline``
here, the RayJob's ``activeDeadlineSeconds`` on Kubernetes) and the job was stopped; 130 Ctrl+C
(the job keeps running; the message says how to follow or stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.cluster import kuberay, preflight
from pipeline.cluster.entrypoint import SubmitError, job_name, note, run_command, tracking_flags
from pipeline.config.exits import Exit
from pipeline.config.flags import config_from_args, forwarded
from pipeline.config.presets import PACKAGE_DIR, presets
from pipeline.config.schema import RunConfig
from pipeline.tracking.redaction import scrub, scrub_url
from pipeline.tracking.store import absolute_sqlite_uri

logger = logging.getLogger(__name__)

WORKING_DIR_EXCLUDES = [
    "/.*",  # .git, .venv, caches and other hidden folders at the top
    ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info",
    "/data", "/runs", "/mlruns", "mlflow.db", "/test-artifacts", "/benchmarks/results",
    "/build", "/dist",
]  # fmt: skip
"""Left out of the uploaded working_dir (gitignore syntax, as Ray's ``excludes``)."""
# --------------------------------------------------------------------------- parser


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """The options of ``n2n submit`` beyond those of ``n2n run``."""
    target = p.add_argument_group("target")
    target.add_argument(
        "--address",
        help="Ray's job server, e.g. http://127.0.0.1:8265 (default $RAY_API_SERVER_ADDRESS); "
        "the job itself joins its cluster with --address auto",
    )
    target.add_argument("--k8s", action="store_true", help="run as a KubeRay RayJob instead")
    target.add_argument(
        "--working-dir",
        help="--address: folder uploaded as the job's code (default: this checkout)",
    )
    target.add_argument(
        "--no-wait", action="store_true", help="submit, print the job's name and exit 0"
    )
    target.add_argument(
        "--deadline", type=int, metavar="SECONDS",
        help="stop the job after this long (exit 4); --k8s: activeDeadlineSeconds, default 48 h",
    )  # fmt: skip
    k8s = p.add_argument_group("--k8s")
    k8s.add_argument(
        "--namespace", help="namespace (default: the kubeconfig context's, or default)"
    )
    k8s.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    k8s.add_argument("--context", help="kubeconfig context (default: the current one)")
    k8s.add_argument("--name", help="RayJob name (DNS-1035, at most 47 characters)")
    k8s.add_argument("--image", help="image with n2n and Ray 2.60 (default n2n:<version>)")
    k8s.add_argument("--gpus", type=int, default=0, help="GPUs per worker pod (default 0)")
    k8s.add_argument("--workers", type=int, default=1, help="worker pods (default 1)")
    k8s.add_argument("--worker-cpus", default="4", help="CPUs per worker pod (default 4)")
    k8s.add_argument("--worker-memory", default="16Gi", help="memory per worker pod (16Gi)")
    k8s.add_argument("--head-cpus", default="2", help="CPUs of the head pod (default 2)")
    k8s.add_argument("--head-memory", default="8Gi", help="memory of the head pod (8Gi)")
    k8s.add_argument(
        "--pvc", help="ReadWriteMany claim for run directories and Tune storage, on every pod"
    )
    k8s.add_argument("--pvc-mount", default="/data", help="where --pvc is mounted (/data)")
    k8s.add_argument(
        "--env-secret", action="append", default=[], metavar="SECRET",
        help="Secret whose keys become environment variables of the Ray pods (S3 keys, "
        "MLFLOW_TRACKING_USERNAME/PASSWORD); repeatable",
    )  # fmt: skip
    k8s.add_argument(
        "--ttl", type=int, default=600, metavar="SECONDS",
        help="delete the Ray cluster this long after the job ends (default 600)",
    )  # fmt: skip
    k8s.add_argument(
        "--keep-cluster", action="store_true", help="keep the Ray cluster after the job (no TTL)"
    )
    k8s.add_argument("--poll", type=float, default=5.0, help="seconds between status checks (5)")
    k8s.add_argument(
        "--dry-run", action="store_true", help="print the manifests as YAML; send nothing"
    )
    k8s.add_argument("--delete", metavar="NAME", help="delete RayJob NAME and its ConfigMap")


# --------------------------------------------------------------------------- command


def submit(args: argparse.Namespace) -> int:
    """Runs ``n2n submit``; returns the exit code (``pipeline.config.exits``)."""
    if args.deadline is not None and args.deadline < 1:
        raise SubmitError(f"--deadline {args.deadline} must be at least 1 second")
    if args.poll <= 0:
        raise SubmitError(f"--poll {args.poll:g} must be above 0 seconds")
    if args.k8s:
        return kuberay.delete(args) if args.delete else kuberay.submit(args)
    if args.delete or args.dry_run:
        flag = "--delete" if args.delete else "--dry-run"
        raise SubmitError(f"{flag} works with --k8s only; add --k8s")
    return submit_ray(args)


def job_command(
    args: argparse.Namespace,
    cfg: RunConfig,
    *,
    preset: str | None,
    extra_overrides: Sequence[str] = (),
) -> list[str]:
    """The ``python -m pipeline run ...`` argv that runs ``cfg`` inside a job.

    The user's own flags are passed on as given (they were validated here), then the run
    directory, tracking URI and ``--address auto`` as ``cfg`` holds them, absolute.
    """
    flags = [arg for o in [*args.overrides, *extra_overrides] for arg in ("--set", o)]
    flags += forwarded(args)
    if args.storage_path:
        flags += ["--storage-path", cfg.output.storage_path]
    if cfg.search.policy_from and not args.resume:  # absolute: the job runs elsewhere
        flags += ["--set", f"search.policy_from={cfg.search.policy_from}"]
    return run_command(
        cfg.output.run_dir, resume=bool(args.resume), preset=preset, flags=flags,
        tracking=tracking_flags(cfg.tracking.enabled, cfg.tracking.uri),
        verbose=args.verbose, quiet=args.quiet,
    )  # fmt: skip


# --------------------------------------------------------------------------- Ray's job server


def auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Ray's token, looked up as Ray 2.60 does: ``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise SubmitError(
                f"RAY_AUTH_TOKEN_PATH={path} names no readable token; fix the path or unset it"
            )
        return token
    path = (home or Path.home()) / ".ray" / "auth_token"
    return (path.read_text().strip() or None) if path.is_file() else None


def project_dir(explicit: str | None = None) -> Path:
    """The folder uploaded as the job's code: ``--working-dir``, else this n2n checkout."""
    if explicit:
        folder = Path(explicit).expanduser().resolve()
        if not (folder / "pipeline" / "__main__.py").is_file():
            raise SubmitError(
                f"--working-dir {folder} holds no n2n checkout (pipeline/__main__.py)"
            )
        return folder
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root
    raise SubmitError(
        f"n2n is installed in {root}, not run from a checkout, so there is no project to upload; "
        "pass --working-dir /path/to/n2n"
    )


def job_preset(preset: str | None, working_dir: Path) -> str | None:
    """The job's ``--preset``: a preset name as is, a file as a path inside ``working_dir``."""
    if preset is None:
        return None
    path = Path(preset).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.is_file()) and preset in presets():
        return preset
    resolved = path.resolve()
    if not resolved.is_relative_to(working_dir):
        raise SubmitError(
            f"--preset {preset} lies outside {working_dir}, the folder uploaded to the cluster; "
            "copy it there (e.g. into configs/) or pass --working-dir"
        )
    return resolved.relative_to(working_dir).as_posix()


def local_inputs(cfg: Any, base: Path) -> list[str]:
    """``--set`` overrides that make relative input paths (teacher, data) absolute.

    Data and runs are not uploaded, and the job runs in another directory: a relative path
    that exists here is passed on as its absolute path (right for a head on this machine or
    on shared storage).
    """
    out = []
    for key, value in (
        ("teacher.checkpoint", cfg.teacher.checkpoint),
        ("data.root", cfg.data.root),
    ):
        if value and not Path(value).expanduser().is_absolute() and (base / value).exists():
            out.append(f"{key}={(base / value).resolve()}")
    return out


def prepare_ray_job(args: argparse.Namespace) -> tuple[Any, list[str], Path]:
    """Validates the run here; returns its config, the job's argv and the working dir."""
    working_dir = project_dir(args.working_dir)
    preset = None if args.resume else job_preset(args.preset, working_dir)
    # --address is the job server here; the job joins its own cluster (--address auto).
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "address": None}))
    uri = absolute_sqlite_uri(cfg.tracking.uri, Path.cwd())
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})
    preflight.check_run(cfg, resume=bool(args.resume))
    extra = [] if args.resume else local_inputs(cfg, Path.cwd())
    return cfg, job_command(args, cfg, preset=preset, extra_overrides=extra), working_dir


def ray_client(address: str) -> Any:
    """A ``JobSubmissionClient`` for ``address`` that sends Ray's token when there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        where = "its token was rejected" if token else "no token was found"
        raise SubmitError(
            f"the Ray cluster at {address} requires token authentication and {where}; put the "
            "head's token (`ray get-auth-token` there) in ~/.ray/auth_token or RAY_AUTH_TOKEN"
        ) from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(
            f"no Ray job server answers at {address} ({type(err).__name__}); start the head with "
            "`ray start --head --dashboard-host 127.0.0.1` (needs ray[default]) or fix --address"
        ) from None


def submit_ray(args: argparse.Namespace) -> int:
    """``n2n submit --address``: submits to Ray's job server and follows the job."""
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise SubmitError(
            "n2n submit needs a target: --address http://HEAD:8265 (Ray's job server) or --k8s"
        )
    if not address.startswith(("http://", "https://")):
        raise SubmitError(
            f"--address {address} is not the job server's URL; use e.g. http://127.0.0.1:8265"
        )
    cfg, argv, working_dir = prepare_ray_job(args)
    client = ray_client(address)
    job_id = job_name(cfg)
    entrypoint = shlex.join(argv)
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=job_id,
        runtime_env={"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES},
        metadata={"n2n_run_dir": cfg.output.run_dir, "n2n_config": cfg.name},
    )
    tracking = scrub_url(cfg.tracking.uri) if cfg.tracking.enabled else "off"
    note(f"submitted job {job_id} to {address}: {scrub(entrypoint)}")
    note(f"run directory {cfg.output.run_dir}; MLflow {tracking}")
    ray_job = f"{'RAY_AUTH_MODE=token ' if auth_token() else ''}ray job"
    hint = (
        f"follow: {ray_job} logs -f {job_id} --address {address}; "
        f"stop: {ray_job} stop {job_id} --address {address}"
    )
    if args.no_wait:
        note(hint)
        return Exit.OK
    return follow_ray_job(client, job_id, args.deadline, hint)


def follow_ray_job(client: Any, job_id: str, deadline_s: float | None, hint: str) -> int:
    """Streams the job's logs to stdout until it ends; returns the exit code of its status."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), deadline_s))
    except TimeoutError:
        client.stop_job(job_id)
        status = wait_until(lambda: client.get_job_status(job_id), JobStatus.is_terminal, 60)
        note(f"job {job_id} passed --deadline {deadline_s} s and was stopped ({status})")
        return Exit.DEADLINE
    except KeyboardInterrupt:
        note(f"stopped following; job {job_id} keeps running ({hint})")
        return Exit.INTERRUPTED
    except RuntimeError as err:  # the log stream broke; the status still tells the outcome
        note(f"lost the log stream ({err}); waiting for the job's status")
    info = wait_until(lambda: client.get_job_info(job_id), lambda i: i.status.is_terminal(), None)
    if info.status == JobStatus.SUCCEEDED:
        note(f"job {job_id} SUCCEEDED")
        return Exit.OK
    message = (info.message or "").strip().splitlines()
    note(f"job {job_id} {info.status.value}" + (f": {message[0]}" if message else ""))
    return Exit.STOPPED if info.status == JobStatus.STOPPED else Exit.FAILED


def wait_until(
    get: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float | None, every_s: float = 1
) -> Any:
    """Calls ``get`` until ``done`` holds for its value (or ``timeout_s`` passes); returns it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    value = get()
    while not done(value) and (deadline is None or time.monotonic() < deadline):
        time.sleep(every_s)
        value = get()
    return value

"""Planning and running the claims' trainings: one child process per (arm, seed) chaining `nucleus train`,
`nucleus merge`, `nucleus eval compositional` and `nucleus inspect-routing`, skipping what already exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ...training.checkpoint import latest_checkpoint
from ..ablation import heldout_records
from .arms import CONTROL, Arm, ClaimsConfig, _control, check_arms, common_overrides, run_dir, select
from .summary import report

SAMPLE_STEPS, EVAL_BATCH = 16, 48


def train_command(cfg: ClaimsConfig, arm: Arm, seed: int, data: Path, out: Path) -> list[str]:
    args = ["train", "--preset", "tiny", "--data", str(data), "--out", str(run_dir(out, arm.name, seed) / "run")]
    args += ["--no-progress", "--threads", "1"]
    for item in common_overrides(cfg, seed) + list(arm.overrides):
        args += ["--set", item]
    if cfg.max_steps is not None:
        args += ["--max-steps", str(cfg.max_steps)]
    return args


def run_commands(
    cfg: ClaimsConfig, arm: Arm, seed: int, data: Path, out: Path, routing: bool, train_only: bool = False
) -> list[list[str]]:
    """The commands of one run still to do: train unless `losses.json` exists, then (unless `train_only`) merge,
    score and, with `routing`, measure the routing."""
    d, source = run_dir(out, arm.name, seed), run_dir(out, arm.run_name, seed) / "run"
    commands = []
    train, job = train_command(cfg, arm, seed, data, out), d / "train_command.json"
    if arm.trains and job.exists() and json.loads(job.read_text()) != train:
        raise ValueError(
            f"{d} was trained with other settings (see {job}); give another --out, or the same steps and --set"
        )
    if arm.trains and not (source / "losses.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        job.write_text(json.dumps(train) + "\n")
        if latest_checkpoint(source) is not None:
            train.append("--resume")
        elif source.exists():
            shutil.rmtree(source)  # started but never checkpointed: start over
        commands.append(train)
    if train_only:
        return commands
    merged = d / "merged"
    if not (merged / "merge.json").exists():
        merge = ["merge", str(source), "--out", str(merged), "--threads", "1"]
        merge += ["--last", str(arm.merge_last)] if arm.merge_last else []
        commands.append(merge + (["--ema"] if arm.ema else []))
    if not (d / "eval" / "report.json").exists():
        commands.append(
            ["eval", "compositional", "--model", str(merged), "--prompts", str(out / "prompts.jsonl")]
            + ["--out", str(d / "eval"), "--samples", str(cfg.samples), "--steps", str(SAMPLE_STEPS)]
            + ["--batch-size", str(EVAL_BATCH), "--device", "cpu", "--threads", "1"]
        )
    if routing and not (d / "routing" / "routing.json").exists():
        commands.append(
            ["inspect-routing", "--model", str(merged), "--prompts", str(out / "routing_prompts.jsonl")]
            + ["--out", str(d / "routing"), "--device", "cpu", "--threads", "1"]
        )
    return commands


# One child per run: the `nucleus` commands in order in one process (torch imported once), stopping at a failure.
WORKER = (
    "import json, sys\nfrom nucleus_image.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
    "    print('$ nucleus ' + ' '.join(argv), flush=True)\n    code = main(argv)\n    if code:\n"
    "        sys.exit(code)\n"
)


def plan_runs(cfg: ClaimsConfig, selected, data: Path, out: Path) -> list[tuple[Arm, int, list[list[str]]]]:
    """Seeds outer, arms inner (the first finished runs already compare every arm on one seed); one run per
    (arm, seed) however many claims share it, and the control's training wherever an arm merges it."""
    routing = {a.name for c, arms in selected if c.routing for a in arms}
    arms = {a.name: a for _, claim_arms in selected for a in claim_arms}
    sources = {a.run_name for a in arms.values()} - set(arms)  # trained only for others to merge
    arms.update({name: _control(name) for name in sources})
    plan = []
    for seed in cfg.seeds:
        for arm in sorted(arms.values(), key=lambda a: (not a.trains, a.name != CONTROL)):
            commands = run_commands(cfg, arm, seed, data, out, arm.name in routing, arm.name in sources)
            if commands:
                plan.append((arm, seed, commands))
    return plan


def execute(plan, out: Path, parallel: int, env: dict | None = None) -> list[str]:
    """Run the plan, `parallel` children at a time, a run that merges another's training only once that training
    has finished. Returns the failures (each naming its log); the other runs go on."""
    env = env or dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, failed = list(plan), {}, []
    training = {(a.name, s) for a, s, cmds in plan if cmds and cmds[0][0] == "train"}
    try:
        while pending or running:
            for key, (proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                training.discard(key)
                log = run_dir(out, *key) / "log.txt"
                if proc.returncode:
                    failed.append(f"{key[0]} seed {key[1]}: exit {proc.returncode}, see {log}")
                print(
                    f"{key[0]} seed {key[1]}: {'failed' if proc.returncode else 'done'} "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            for item in list(pending):
                if len(running) >= parallel:
                    break
                arm, seed, commands = item
                if not arm.trains and not (run_dir(out, arm.run_name, seed) / "run" / "losses.json").exists():
                    if (arm.run_name, seed) not in training:  # that training failed
                        failed.append(f"{arm.name} seed {seed}: the {arm.run_name} run it merges did not train")
                        pending.remove(item)
                    continue  # its training is still going
                pending.remove(item)
                d = run_dir(out, arm.name, seed)
                d.mkdir(parents=True, exist_ok=True)
                with open(d / "log.txt", "a") as log:  # the child keeps its own descriptor
                    proc = subprocess.Popen(
                        [sys.executable, "-c", WORKER, json.dumps(commands)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                running[(arm.name, seed)] = (proc, time.perf_counter())
                print(f"{arm.name} seed {seed}: {', '.join(c[0] for c in commands)} started", flush=True)
            time.sleep(0.5)
    finally:  # interrupted: do not leave children training unattended
        for proc, _ in running.values():
            proc.terminate()
            proc.wait()
    return failed


def prepare_prompts(data: Path, out: Path, per_task: int, routing_per_task: int) -> None:
    """OUT/prompts.jsonl and OUT/routing_prompts.jsonl: the first prompts of each held-out task, written once (a
    rerun with other counts would score other prompts than the runs already scored)."""
    for name, count in (("prompts.jsonl", per_task), ("routing_prompts.jsonl", routing_per_task)):
        text = "".join(json.dumps(r) + "\n" for r in heldout_records(data, count))
        file = out / name
        if file.exists() and file.read_text() != text:
            raise ValueError(f"{file} holds other prompts than --per-task/--routing-per-task give; use another --out")
        file.write_text(text)


LOCK_FILE = ".claims.lock"


@contextmanager
def run_lock(out: Path):
    """One `nucleus ablate claims` per OUT at a time: two would plan the same runs, and each would find the other's
    trainings started and count them as failures. OUT/.claims.lock holds the owner's pid; a lock whose process is
    gone (killed with SIGKILL, the machine restarted) is taken over."""
    lock = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                raise ValueError(
                    f"another nucleus ablate claims (pid {owner}) is running on {str(out)!r}; wait for it, stop it, "
                    f"or give another --out (its runs are skipped by a later rerun, not redone)"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise ValueError(f"could not take the lock {str(lock)!r}; remove it if no nucleus ablate claims is running")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def run_claims(cfg: ClaimsConfig, data: str | Path, out: str | Path, command: str, check_command=None) -> list[dict]:
    """Train and score what is missing, then write each claim's summary. `check_command(argv)` may refuse a
    planned `nucleus` command (a flag this version lacks) before anything runs. Raises when a run failed, after
    writing the summaries of what finished."""
    data, out = Path(data), Path(out)
    selected = select(cfg)
    check_arms(cfg, selected)
    if not data.is_dir():
        raise ValueError(f"--data {str(data)!r} is not a dataset folder (make one with `nucleus data synth`)")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        prepare_prompts(data, out, cfg.per_task, cfg.routing_per_task)
        plan = plan_runs(cfg, selected, data, out)
        for arm, _seed, commands in plan if check_command else ():
            for argv in commands:
                try:
                    check_command(argv)
                except ValueError as err:
                    raise ValueError(f"arm {arm.name}: {err}") from None
        failed = execute(plan, out, cfg.parallel)
        summaries = report(cfg, out, command)
    if failed:
        raise RuntimeError("runs failed:\n" + "\n".join(failed))
    return summaries

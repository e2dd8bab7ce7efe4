"""The iteration loop every iterative recipe runs in: resume, checkpoints, metrics exactly once, recovery.

A recipe is an object with five verbs (``Recipe``); ``drive`` calls them:

    last = latest complete checkpoint (or none)
    recipe.start(last)                       actors from the checkpoint's models and states
    for t after last:
        m = recipe.iteration(t)
        if a checkpoint is due and the non-finite guard is clear:
            files = recipe.save(partial dir)  every rank's files, reported back
            metrics line t                   written before the commit: a crash in between re-runs t,
            commit (verify, fsync, rename)   whose line the restart drops
        else: metrics line t
    recipe.finish()                          final evaluation and report, once the last iteration is done

When an actor dies or a call passes its deadline, every group is torn down and the loop starts again
from the last checkpoint (``run.max_restarts`` times), so a recovered run has each iteration exactly once
and, on CPU, the numbers of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from afd_ray.config import Config
from afd_ray.runtime.guard import NonFiniteGuard
from afd_ray.runtime.rundir import Checkpoint, RunDir
from afd_ray.runtime.system import System

log = logging.getLogger("afd_ray")


class RunStopped(RuntimeError):
    """The run cannot go on by itself (restarts used up, a persistent fault); it is resumable."""


class Recipe(Protocol):
    system: System | None  # the actors, built by start(); drive() shuts them down
    guard: NonFiniteGuard  # no checkpoint while a role is in a non-finite streak

    def start(self, last: Checkpoint | None) -> None: ...
    def iteration(self, t: int) -> dict[str, float]: ...
    def save(self, tmp: Path) -> dict[str, dict[int, dict[str, int]]]: ...
    def finish(self) -> None: ...


def actor_failure(e: BaseException) -> bool:
    """An error that a restart from the last checkpoint can cure: a dead actor, a lost node or object, or
    a call past its deadline (anything else, a bug or a bad value, would only fail again)."""
    import ray.exceptions as rex

    from afd_ray.workers.group import CallTimeout

    return isinstance(e, rex.RayActorError | rex.WorkerCrashedError | rex.NodeDiedError | rex.ObjectLostError
                      | rex.GetTimeoutError | rex.ActorUnavailableError | CallTimeout)


def end_iteration(cfg: Config, first: int) -> int:
    """The last iteration this invocation runs: ``run.iterations``, or ``run.stop_after`` after ``first``."""
    c = cfg.run
    return min(c.iterations, first - 1 + c.stop_after) if c.stop_after else c.iterations


def drive(rd: RunDir, cfg: Config, recipe: Recipe, echo=print, line=None) -> bool:
    """Run ``recipe`` from its last checkpoint to ``end_iteration``; True when the run is complete
    (``recipe.finish`` has run), False when it stopped early by ``run.stop_after``."""
    last = rd.latest()
    end = end_iteration(cfg, (last.iteration if last else 0) + 1)
    restarts = 0
    while True:
        last = rd.latest()
        done = last.iteration if last else 0
        rd.truncate_metrics(done)  # the iterations after the last checkpoint run again
        try:
            recipe.start(last)
            if last is not None:
                echo(f"continuing {rd.path} after iteration {done}")
            started = time.perf_counter()
            for t in range(done + 1, end + 1):
                m = recipe.iteration(t)
                m["run/restarts"] = float(restarts)
                # no checkpoint over the last good one while a role is in a non-finite streak; but the last
                # iteration is committed anyway (a skipped step changes no weights) so the run can finish
                due = t % cfg.run.checkpoint_every == 0 or t == end
                if due and (recipe.guard.clean or t == end):
                    t0 = time.perf_counter()
                    tmp = rd.begin(t)
                    written = recipe.save(tmp)
                    m["time/checkpoint"] = time.perf_counter() - t0
                    rd.append_metrics(m)
                    rd.commit(t, tmp, written, cfg.run.keep_checkpoints)
                else:
                    if due:
                        log.warning("iteration %d: no checkpoint while a non-finite streak lasts", t)
                    rd.append_metrics(m)
                echo((line(m) if line else summary_line(m)) + progress(t, done, end, time.perf_counter() - started))
            if end == cfg.run.iterations:
                recipe.finish()
            return end == cfg.run.iterations
        except Exception as e:
            dead = _dead_roles(recipe)
            if not (actor_failure(e) or dead):
                raise
            restarts += 1
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            last = rd.latest()
            rd.event("restart" if restarts <= cfg.run.max_restarts else "stopped", restart=restarts,
                     after_iteration=last.iteration if last else 0, dead_roles=dead, reason=reason[:500])
            if restarts > cfg.run.max_restarts:
                raise RunStopped(f"{reason}; {restarts - 1} restarts used up (run.max_restarts="
                                 f"{cfg.run.max_restarts}). The run stops with its last checkpoint; continue it with "
                                 f"--resume {rd.path}") from e
            echo(f"restart {restarts}/{cfg.run.max_restarts}: {reason[:200]} (dead: {', '.join(dead) or 'none'});"
                 " recreating the actors from the last checkpoint")
        finally:
            if recipe.system is not None:
                recipe.system.shutdown()
                recipe.system = None


def _dead_roles(recipe: Recipe) -> list[str]:
    try:
        return recipe.system.dead_roles() if recipe.system is not None else []
    except Exception:  # the liveness probe itself failed: Ray is in trouble, say nothing more
        return []


def progress(t: int, done: int, end: int, elapsed: float) -> str:
    """``  [t/end, eta H:MM:SS]``: where the run is and, at this invocation's mean pace, when it ends."""
    eta = elapsed / (t - done) * (end - t)
    return f"  [{t}/{end}, eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}]"


def summary_line(m: dict) -> str:
    keys = [("iteration", "it", "{:.0f}"), ("rollout/reward", "r", "{:+.3f}"), ("rollout/kl", "kl", "{:.3f}"),
            ("heldout/reward_accuracy", "acc", "{:.2f}"), ("golden/heldout_policy", "golden", "{:.3f}"),
            ("sync/sync_seconds", "sync", "{:.2f}s"), ("time/iteration", "time", "{:.1f}s")]
    return "  ".join(f"{short}={fmt.format(m[k])}" for k, short, fmt in keys if k in m)

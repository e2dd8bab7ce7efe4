"""Progress bars for the long jobs besides the IRL loop (whose iteration lines carry ``[t/end, eta]``): SFT
steps, Best-of-N samples, evaluation generation and judging. Rate and ETA on a terminal; nothing at all
when stderr is not one (a log file, CI, ``ray job submit``), so files never fill with bar redraws.

The SFT job's steps run in Ray Train workers, possibly on other nodes: rank 0 puts each step's metrics on a
Ray queue that a driver thread reads (``follow``); the queue exists only while a bar is shown.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


def bar(total: int, desc: str, unit: str = "it", file=None):
    """A tqdm bar on ``file`` (stderr), disabled (every call a no-op) when that is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=file, disable=None, leave=False, dynamic_ncols=True,
                smoothing=0.1)


@contextmanager
def follow(b, key: str = "step", postfix: tuple[str, ...] = ("loss",)):
    """A Ray queue (or None when ``b`` is disabled) whose items, metric dicts put by a remote job, move
    ``b`` to their ``key`` and show their ``postfix`` metrics; read by a thread until the block ends."""
    if b.disable:
        yield None
        return
    from ray.util.queue import Queue

    q = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def read():
        while not stop.is_set():
            try:
                m = q.get(timeout=0.5)
            except Exception:  # Empty, or a queue actor gone: the bar just stops moving
                continue
            b.n = int(m.get(key, b.n))
            b.set_postfix({k: f"{m[k]:.4g}" for k in postfix if k in m}, refresh=False)
            b.refresh()

    reader = threading.Thread(target=read, daemon=True, name="progress")
    reader.start()
    try:
        yield q
    finally:
        stop.set()
        reader.join(timeout=2)
        b.close()
        q.shutdown()


def put(q, item: dict) -> None:
    """Put ``item`` on a ``follow`` queue if there is one; never fails the job that reports."""
    if q is None:
        return
    try:
        q.put_nowait(item)
    except Exception:  # a full or vanished queue costs the bar a step, not the job
        pass

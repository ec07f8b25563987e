"""``ghlc train --nproc-per-node N``: start N training processes through torch's own launcher
(``torch.distributed.launcher.api.elastic_launch``, what ``torchrun --standalone`` runs), and
report a failed process as one line.

Each process runs ``python -m ghlc.cli train`` with the same options less
``--nproc-per-node``. A process that fails records its error in the launcher's error file
(``TORCHELASTIC_ERROR_FILE``) and, when ghlc started it, exits without printing; the
launcher stops the others, and ``ghlc`` prints which process failed and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, TypeVar

import click

from .errors import GHLError, describe

__all__ = ["command_line", "launch", "rank_errors", "relaunch"]

# set in the processes ghlc's launcher starts: they leave the printing to it
LAUNCHED_BY_GHLC = "GHLC_LAUNCHED"

F = TypeVar("F", bound=Callable[..., Any])


def command_line(ctx: click.Context, drop: tuple[str, ...] = ()) -> list[str]:
    """The options and arguments of ``ctx``'s command as parsed, as a command line (the
    parameters named in ``drop`` left out; the arguments after ``--``)."""
    opts: list[str] = []
    args: list[str] = []
    for p in ctx.command.params:
        if p.name in drop or not p.expose_value or p.name is None:
            continue
        value = ctx.params.get(p.name)
        if isinstance(p, click.Argument):
            args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif isinstance(p, click.Option):
            if p.is_flag and p.secondary_opts:
                opts.append(p.opts[0] if value else p.secondary_opts[0])
            elif p.is_flag:
                if value:
                    opts.append(p.opts[0])
            elif value is None:
                continue
            elif p.multiple:
                for v in value:
                    opts += [p.opts[0], str(v)]
            else:
                opts += [p.opts[0], str(value)]
    return [*opts, "--", *args]


def relaunch(nproc: int) -> None:
    """Run the current click command in ``nproc`` processes (``--nproc-per-node`` left out)."""
    from .ranks import launched

    if launched():
        raise GHLError(
            "--nproc-per-node: this process was already started by a launcher (torchrun); "
            "leave the option out"
        )
    ctx = click.get_current_context()
    launch(nproc, [str(ctx.info_name), *command_line(ctx, drop=("nproc_per_node",))])


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The launcher's own log lines silenced (ghlc reports a failure in one line)."""
    log = logging.getLogger(name)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    try:
        yield
    finally:
        log.setLevel(level)
        log.propagate = propagate


def launch(nproc: int, ghlc_args: list[str]) -> None:
    """Start ``python -m ghlc.cli *ghlc_args`` in ``nproc`` processes on this machine through
    torch's elastic launcher (standalone rendezvous, no restarts) and wait for them. Like
    ``torchrun``, sets ``OMP_NUM_THREADS=1`` unless it is set. A failed process raises a
    one-line :class:`GHLError` naming its rank and its error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    env = {LAUNCHED_BY_GHLC: "1"}
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"
    sys.stdout.flush()
    try:
        with _environ(**env), _quiet("torch.distributed"):
            elastic_launch(config, sys.executable)("-m", "ghlc.cli", *ghlc_args)
    except ChildFailedError as e:
        raise GHLError(_summary(e, nproc)) from None
    except SignalException as e:  # Ctrl-C (or a signal to this process): the processes stop
        raise GHLError(
            f"interrupted ({signal.Signals(e.sigval).name}); the last checkpoint keeps the last "
            "completed epoch: continue with --resume"
        ) from None
    except GHLError:
        raise
    except Exception as e:  # the launcher itself (rendezvous, a signal to this process)
        raise GHLError(f"the launcher failed: {describe(e)}") from None


def _summary(e: Any, nproc: int) -> str:
    """One line for a ``ChildFailedError``: the root cause's rank and error. The processes
    that lost a peer fail too, and the launcher stops the rest with SIGTERM, so the root
    cause is taken in this order: a ghlc error, a process killed by another signal, any
    other error recorded, a non-zero exit code, SIGTERM; then the earliest, then the lowest
    rank."""

    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, f = item
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        if data.get("ghlc") == "error":
            kind = 0
        elif f.exitcode < 0:
            kind = 4 if -f.exitcode == signal.SIGTERM else 1
        else:
            kind = 2 if data.get("ghlc") else 3
        return kind, int(f.timestamp), rank

    rank, f = min(e.failures.items(), key=order)
    data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
    if data.get("ghlc") == "crash":  # not a user error: where to see its traceback
        why = f"{f.message} (torchrun --nproc-per-node {nproc} -m ghlc.cli ... shows the traceback)"
    elif data.get("ghlc"):
        why = str(f.message)
    elif f.exitcode < 0:
        why = f"killed by {f.signal_name()}"
    else:
        why = f"exited with code {f.exitcode}"
    return f"process {rank} of {nproc} failed: {why}"


class _Stopped(BaseException):
    """SIGTERM, as the launcher stops the other processes when one fails: raised so that
    files being written are cleaned up (``ghlc.fileio``) before the process ends."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped


def _record(e: BaseException) -> None:
    """Write ``e`` as one line to the launcher's error file (where torch's launcher reads
    a process's failure), marked as ghlc's."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if isinstance(e, _Stopped):
        kind, msg = "stopped", "stopped by the launcher (SIGTERM)"
    elif isinstance(e, GHLError):
        kind, msg = "error", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    elif isinstance(e, KeyboardInterrupt):
        kind, msg = "error", "interrupted"
    else:
        kind, msg = "crash", describe(e)
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump({"message": msg, "timestamp": str(int(time.time())), "ghlc": kind}, f)


def rank_errors(fn: F) -> F:
    """For a command that may run in a process started by torch's launcher: an error is
    recorded in the launcher's error file; in a process started by ``ghlc
    --nproc-per-node`` it then ends the process quietly (exit code 1), as ghlc's launcher
    prints it. SIGTERM (the launcher stopping the processes) ends it quietly after files
    being written are cleaned up. The process group, if one was joined, is left at the
    end."""

    @wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            signal.signal(signal.SIGTERM, _stop)
        try:
            return fn(*a, **k)
        except (SystemExit, click.exceptions.Exit):
            raise
        except BaseException as e:
            if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
                raise
            _record(e)
            if os.environ.get(LAUNCHED_BY_GHLC) or isinstance(e, _Stopped):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)  # (no exit-time output: the launcher reports the failure)
            raise
        finally:
            _leave_group()

    return wrapper  # type: ignore[return-value]


def _leave_group() -> None:
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

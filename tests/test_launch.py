"""Training on several processes (ghlc/ranks.py, ghlc/launch.py): the epoch sampler, the
command line handed to the processes, rank 0 alone writing, and (slow) ``ghlc train
--nproc-per-node`` and ``torchrun`` on CPU processes (gloo) end to end."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ghlc import prepare
from ghlc.cli import main
from ghlc.errors import GHLError
from ghlc.launch import _summary, command_line
from ghlc.ranks import EpochSampler, Ranks, RankTrainer, join
from ghlc.train import Trainer, load_checkpoint
from ghlc.trainconfig import TrainConfig

LIMIT_S = 240  # each command of the end-to-end tests


# ---- the sampler -----------------------------------------------------------------------


@pytest.mark.parametrize("size,world", [(10, 1), (10, 2), (10, 3), (7, 4), (3, 5), (1438, 2)])
def test_shares_are_disjoint_equal_and_cover_the_epoch(size, world):
    shares = [EpochSampler(size, world, r, seed=3).indices() for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == math.ceil(size / world)
    every = torch.cat(shares)
    assert set(every.tolist()) == set(range(size))  # the whole epoch
    assert len(every) - size == (-size) % world  # padding only: under one sample per process
    if size % world == 0:
        assert len(set(every.tolist())) == size  # disjoint
    dropped = [EpochSampler(size, world, r, 3, drop_last=True).indices() for r in range(world)]
    flat = torch.cat(dropped).tolist()
    assert len(flat) == len(set(flat)) == size - size % world


def test_every_rank_has_the_same_permutation_which_changes_per_epoch():
    def perm(rank: int, epoch: int) -> list[int]:
        s = EpochSampler(50, 3, rank, seed=7)
        s.set_epoch(epoch)
        assert list(s) == s.indices().tolist()
        return s.permutation().tolist()

    assert perm(0, 1) == perm(1, 1) == perm(2, 1)
    assert perm(0, 1) != perm(0, 2)
    # the order one process trains in (ghlc.train.Trainer)
    one = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1000 + 2)).tolist()
    assert perm(1, 2) == one


@pytest.mark.parametrize("size,world,batch", [(1438, 2, 64), (100, 4, 8), (101, 4, 8)])
def test_a_step_over_all_ranks_is_the_step_of_one_process(size, world, batch):
    one = EpochSampler(size, seed=1).indices()
    shares = [EpochSampler(size, world, r, seed=1).indices() for r in range(world)]
    local = batch // world
    steps = math.ceil(len(shares[0]) / local)
    assert steps == math.ceil(size / batch)  # the schedule does not depend on the count
    for s in range(steps):
        union = torch.cat([sh[s * local : (s + 1) * local] for sh in shares]).tolist()
        mine = one[s * batch : (s + 1) * batch].tolist()
        assert set(mine) <= set(union)
        extra = set(union) - set(mine)  # the padding, in the epoch's last step
        assert extra <= set(one[: (-size) % world].tolist()) and len(union) - len(mine) < world


# ---- pieces that need no processes -------------------------------------------------------


def test_the_processes_get_the_same_command_line():
    train = main.commands["train"]
    argv = ["m.ghl", "--epochs", "3", "--lr", "0.001", "--augment", "--resume"]
    argv += ["--nproc-per-node", "2", "--backend", "gloo", "--out", "o d"]
    ctx = train.make_context("train", argv)
    line = command_line(ctx, drop=("nproc_per_node",))
    assert "--nproc-per-node" not in line and line[-2:] == ["--", "m.ghl"]
    again = train.make_context("train", line)
    want = {k: v for k, v in ctx.params.items() if k != "nproc_per_node"}
    assert {k: v for k, v in again.params.items() if k != "nproc_per_node"} == want


def _failure(exitcode: int, ghlc: str | None = None, message: str = "", t: int = 100):
    data = {"message": message, "ghlc": ghlc} if ghlc else {}
    return SimpleNamespace(
        exitcode=exitcode,
        error_file_data=data,
        message=message,
        timestamp=t,
        signal_name=lambda: signal.Signals(-exitcode).name,
    )


def test_the_root_cause_of_a_failure_is_reported():
    sigterm, sigkill = -signal.SIGTERM, -signal.SIGKILL
    lost = _failure(1, "crash", "DistBackendError: connection closed")
    e = SimpleNamespace(failures={0: _failure(sigterm), 1: _failure(sigkill), 2: lost})
    assert _summary(e, 3) == "process 1 of 3 failed: killed by SIGKILL"
    e.failures[2] = _failure(1, "error", "x.npz: data file not found", t=101)
    assert _summary(e, 3) == "process 2 of 3 failed: x.npz: data file not found"
    e = SimpleNamespace(failures={0: _failure(sigterm), 1: _failure(3)})
    assert _summary(e, 2) == "process 1 of 2 failed: exited with code 3"
    e.failures[0] = lost
    assert _summary(e, 2) == (
        "process 0 of 2 failed: DistBackendError: connection closed "
        "(torchrun --nproc-per-node 2 -m ghlc.cli ... shows the traceback)"
    )


def test_one_process_needs_no_backend():
    assert join(None, torch.device("cpu")) == Ranks()
    with pytest.raises(GHLError, match="--backend gloo: only for several processes"):
        join("gloo", torch.device("cpu"))
    with pytest.raises(GHLError, match="--backend nccl needs CUDA devices"):
        join("nccl", torch.device("cpu"))


def test_other_ranks_write_nothing(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    config = TrainConfig(out_dir=tmp_path / "o", plastic=set(), batch_size=4)
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    t = RankTrainer(model, config, Ranks(rank=1, world=2))
    t.setup(x, y, x, y)
    t.start()
    t.checkpoint(best=True)
    t.write_metrics()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    bad = TrainConfig(out_dir=tmp_path / "o", plastic=set(), batch_size=5)
    with pytest.raises(GHLError, match="batch size 5 is not a multiple of the 2 processes"):
        RankTrainer(model, bad, Ranks(rank=0, world=2)).setup(x, y)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, in this process."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
@pytest.mark.parametrize("prepared", [True, False])
def test_the_rank_trainer_of_one_process_is_the_trainer(tmp_path, prepared):
    def run(make, out: str):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
        x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 3
        if prepared:
            net = prepare(net, (x[:2],))
        plastic = {"0.weight"} if prepared else set()
        cfg = TrainConfig(out_dir=tmp_path / out, plastic=plastic, batch_size=8, epochs=2)
        t = make(net, cfg)
        res = t.fit(x, y, x[:13], y[:13])
        return t, net, res

    t, net, res = run(lambda m, c: RankTrainer(m, c, Ranks(rank=0, world=1)), "rank")
    assert isinstance(t.train_module(), DistributedDataParallel)
    _, ref, want = run(Trainer, "one")
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    for got, exp in zip(res.history, want.history):
        assert got["test_acc"] == exp["test_acc"] and got["train_acc"] == exp["train_acc"]
        assert got["test_loss"] == pytest.approx(exp["test_loss"], rel=1e-6)
        assert got["train_loss"] == pytest.approx(exp["train_loss"], rel=1e-6)
    assert len(_metrics(tmp_path / "rank")) == 2


def test_nproc_under_a_launcher_is_refused(tmp_path, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(main, ["train", "m.ghl", "--nproc-per-node", "2"])
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        "error: --nproc-per-node: this process was already started by a launcher "
        "(torchrun); leave the option out"
    )


# ---- end to end: several processes -------------------------------------------------------

MODEL = """
import torch.nn as nn

def tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, *cmd], cwd=cwd, capture_output=True, text=True, timeout=LIMIT_S, env=_env()
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ghlc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["-m", "ghlc.cli", *args], cwd, check)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("nproc")
    (d / "model.py").write_text(MODEL)
    ghlc("convert", "model.py", "--input-shape", "1,1,8,8", cwd=d)
    return d


def _metrics(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_with_any_count(converted):
    d = converted
    r = ghlc(
        "train", "model.ghl", "--data", "digits", "--nproc-per-node", "2", "--out", "two", cwd=d
    )
    assert r.stdout.count("training on cpu, 2 processes (gloo)") == 1
    assert r.stdout.count("epochs 1: test acc") == 1  # rank 0 alone prints
    run = d / "two"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
        "model.ghl",
    ]
    two = _metrics(run)
    assert [m["epoch"] for m in two] == [1] and load_checkpoint(run / "last.pt")["epoch"] == 1
    # the same steps as one process (the global batch, split across the two)
    ghlc("train", "model.ghl", "--data", "digits", "--out", "one", cwd=d)
    one = _metrics(d / "one")[0]
    for k in ("train_loss", "test_loss"):
        assert two[0][k] == pytest.approx(one[k], rel=1e-5)
    for k in ("train_acc", "test_acc"):
        assert abs(two[0][k] - one[k]) <= 2 / 359
    # the test metrics reduced over the ranks are one process's evaluation
    ev = ghlc("eval", "two/last.pt", cwd=d).stdout.split()
    assert float(ev[1]) == pytest.approx(two[0]["test_loss"], abs=6e-5)
    assert float(ev[3]) == pytest.approx(two[0]["test_acc"], abs=6e-5)
    # resumed by one process, then by two under torchrun
    r = ghlc("train", "model.ghl", "--nproc-per-node", "1", "--out", "two", "--epochs", "2",
             "--resume", cwd=d)  # fmt: skip
    assert "epochs 2" in r.stdout and "processes" not in r.stdout
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = _run([*torchrun, "-m", "ghlc.cli", "train", "model.ghl", "--out", "two", "--epochs", "3",
              "--resume"], d)  # fmt: skip
    assert r.stdout.count("epochs 3: test acc") == 1
    three = _metrics(run)
    assert [m["epoch"] for m in three] == [1, 2, 3] and three[0] == two[0]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3 and not _leftovers(run)


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"GHLC_LAUNCHED=1" in env:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs Linux /proc")
def test_a_rank_that_dies_ends_the_run_in_one_line(converted):
    d = converted
    cmd = [sys.executable, "-m", "ghlc.cli", "train", "model.ghl", "--nproc-per-node", "2"]
    cmd += ["--batch-size", "8", "--epochs", "6", "--out", "dies"]
    p = subprocess.Popen(cmd, cwd=d, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run, victim = d / "dies", None
    try:
        deadline = time.monotonic() + LIMIT_S
        while time.monotonic() < deadline and p.poll() is None:
            if (run / "metrics.jsonl").is_file() and _metrics(run):
                victim = _rank_pid(p.pid, 1)
                break
            time.sleep(0.2)
        assert victim is not None, "rank 1 not found after the first epoch"
        os.kill(victim, signal.SIGKILL)
        out, err = p.communicate(timeout=LIMIT_S)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    text = err.decode()
    assert "Traceback" not in text
    errors = [s for s in text.replace("\r", "\n").splitlines() if s.startswith("error")]
    assert errors == ["error: process 1 of 2 failed: killed by SIGKILL"], text
    assert text.rstrip().endswith(errors[0])
    ckpt = load_checkpoint(run / "last.pt")  # whole (metrics.jsonl, written after it, may
    assert 1 <= ckpt["epoch"] < 6  # be an epoch behind if rank 0 was stopped in between)
    assert ckpt["epoch"] - len(_metrics(run)) in (0, 1)
    assert not _leftovers(run)


@pytest.mark.slow
def test_an_error_in_the_processes_is_one_line_before_any_file(converted):
    r = ghlc("train", "model.ghl", "--nproc-per-node", "2", "--batch-size", "63", "--out", "odd",
             cwd=converted, check=False)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.fullmatch(
        r"error: process [01] of 2 failed: batch size 63 is not a multiple of the 2 processes "
        r"\(it is the global batch of a step, split evenly across the processes\)",
        r.stderr.strip(),
    ), r.stderr
    assert not (converted / "odd").exists()

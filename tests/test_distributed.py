"""GHL across processes (runtime/distributed.py): DDP steps on spawned CPU processes (gloo)
against one process on the union batch, in float64 (cases in tests/distcases.py)."""

from __future__ import annotations

import json
import os
import time

import distcases
import pytest
import torch.multiprocessing as mp

TOL = 1e-12
SPAWN_LIMIT_S = 240

# (key, [case, args, kwargs]); every zoo model here is free of batch statistics
PLAN2 = [
    ("conv3d", ["exact", ["conv3d"], {}]),
    ("unet/bucket_view", ["exact", ["unet"], {"gradient_as_bucket_view": True}]),
    ("temporal1d/tiny_buckets", ["exact", ["temporal1d"], {"bucket_cap_mb": 1e-6}]),
    ("vit/find_unused", ["exact", ["vit"], {"find_unused_parameters": True}]),
    ("stdconv", ["exact", ["stdconv"], {}]),
    ("conv_twice", ["exact", ["conv_twice"], {}]),
    ("vit/no_sync", ["exact", ["vit"], {"micro": 3}]),
    ("unet/no_sync+view", ["exact", ["unet"], {"micro": 2, "gradient_as_bucket_view": True}]),
    ("conv3d/static_graph", ["two_steps", ["conv3d"], {"static_graph": True}]),
    ("conv_twice/after_sync", ["after_sync", ["conv_twice"], {}]),
    ("unet/zeroed", ["zeroed", ["unet"], {}]),
    ("control", ["per_rank_control", ["conv3d"], {}]),
    ("refused", ["plain_ddp_refused", ["conv3d"], {}]),
    ("sampled", ["sampled", ["unet"], {}]),
    ("fp16", ["fp16_scaler", ["conv3d"], {}]),
    ("fsdp/unet", ["fsdp", ["unet"], {}]),
    ("fsdp/vit", ["fsdp", ["vit"], {}]),
    ("fsdp/unet/unit+no_sync", ["fsdp", ["unet"], {"micro": 2, "normalisation": "unit"}]),
    ("fsdp/adds", ["fsdp_adds_refused", ["conv3d"], {}]),
]
PLAN3 = [
    ("unet", ["exact", ["unet"], {}]),
    ("vit/no_sync", ["exact", ["vit"], {"micro": 2, "bucket_cap_mb": 1e-6}]),
    ("fsdp/temporal1d", ["fsdp", ["temporal1d"], {}]),
    ("fsdp/conv3d/unit", ["fsdp", ["conv3d"], {"normalisation": "unit"}]),
]


def _run(world: int, plan: list, tmp) -> dict:
    init = f"file://{tmp / 'store'}"
    ctx = mp.start_processes(
        distcases.worker,
        args=(world, init, plan, str(tmp)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_LIMIT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish in {SPAWN_LIMIT_S} s")
    with open(os.path.join(tmp, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run(2, PLAN2, tmp_path_factory.mktemp("ddp2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _run(3, PLAN3, tmp_path_factory.mktemp("ddp3"))


def _errors(res: dict, key: str) -> dict[str, float]:
    r = res[key]
    assert isinstance(r, dict), r  # a traceback string when the case failed
    return r


EXACT2 = [
    k for k, (case, _, _) in PLAN2 if case in ("exact", "two_steps", "after_sync", "zeroed", "fsdp")
]


@pytest.mark.parametrize("key", EXACT2)
def test_two_processes_equal_one_on_the_union_batch(two, key):
    errs = _errors(two, key)
    assert errs and max(errs.values()) <= TOL, {k: v for k, v in errs.items() if v > TOL}


@pytest.mark.slow  # (one more spawn; the two-process cases cover every option)
@pytest.mark.parametrize("key", [k for k, _ in PLAN3])
def test_three_processes_equal_one_on_the_union_batch(three, key):
    errs = _errors(three, key)
    assert errs and max(errs.values()) <= TOL, {k: v for k, v in errs.items() if v > TOL}


def test_per_process_normalisation_is_not_the_rule(two):
    """The negative control: combining per process, then averaging, is far off."""
    errs = _errors(two, "control")
    assert len(errs) == 2 and min(errs.values()) > 1e-2, errs


def test_torch_ddp_without_the_hook_is_refused(two):
    assert _errors(two, "refused") == {"refused": 0.0}


def test_sampled_mode_normalises_globally_with_the_union_sign(two):
    errs = _errors(two, "sampled")
    assert errs and max(errs.values()) <= 1e-12, errs


def test_float16_autocast_with_grad_scaler(two):
    errs = _errors(two, "fp16")
    assert errs and max(errs.values()) <= 0.01, errs


def test_fsdp2_second_backward_without_zero_grad_is_refused(two):
    assert _errors(two, "fsdp/adds") == {"refused": 0.0}


def test_ddp_of_an_unprepared_model_is_refused():
    import torch

    import ghlc

    with pytest.raises(ghlc.RuntimeGHLError, match="ghlc.prepare"):
        ghlc.distributed.ddp(torch.nn.Linear(2, 2))

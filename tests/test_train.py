"""Training loop: param groups, schedule, outputs, checkpoints, exact resume, failure modes."""

import copy
import dataclasses
import inspect
import json
import math
import re
import sys

import pytest
import torch
import torch.nn as nn

import ghlc
import ghlc.train as T
from ghlc.errors import GHLError
from ghlc.runtime import runtime_of
from ghlc.train import TrainingDiverged, TrainingInterrupted, TrainResult, evaluate, train

N_CLASSES = 3


@pytest.fixture(autouse=True)
def fast(request, monkeypatch):
    """Tiny tensors: one thread avoids oversubscription on busy machines. Plotting costs
    ~0.2 s an epoch; only the test that checks it draws curves."""
    if request.node.name != "test_outputs_and_metrics":
        monkeypatch.setattr(T, "_plot", lambda path, history: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x[torch.arange(n), 0, y, y] += 3.0  # a learnable signal
    return x, y


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, N_CLASSES),
    )


def build(kind, x):
    m = make_model()
    if kind == "bp":
        return m, set()
    m = ghlc.prepare(m, (x[:1],))
    return m, set(runtime_of(m).sites)


def run(kind, out, epochs=3, resume=False, model=None, **kw):
    x, y = make_data()
    xt, yt = make_data(32, seed=1)
    if model is None:
        model, plastic = build(kind, x)
    else:
        plastic = set(runtime_of(model).sites) if kind == "ghl" else set()
    kw.setdefault("batch_size", 16)
    res = train(
        model,
        x,
        y,
        xt,
        yt,
        plastic=plastic,
        epochs=epochs,
        out_dir=out,
        resume=resume,
        progress=False,
        lr=0.05,
        lr_plastic=0.05,
        **kw,
    )
    return model, res


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_outputs_and_metrics(tmp_path):
    m, res = run("ghl", tmp_path, epochs=2, classes=["a", "b", "c"])
    assert isinstance(res, TrainResult) and res.epochs_run == 2 and res.out_dir == tmp_path
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in (
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "seconds",
        "images_per_s",
    ):
        assert key in lines[0]
    assert res.final == lines[-1]
    assert res.best_acc == max(r["test_acc"] for r in lines)
    assert (tmp_path / "curves.png").stat().st_size > 0
    for name in ("last.pt", "best.pt"):
        ck = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert ck["format"] == "ghlc-checkpoint" and isinstance(ck["torch_rng_state"], torch.Tensor)
        assert {"model", "optimizer", "scheduler", "epoch", "best_acc"} <= ck.keys()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    # eval-mode checkpoint weights == the trained module's
    assert_identical(torch.load(tmp_path / "last.pt", weights_only=True)["model"], state(m))


def test_param_groups_and_cosine(tmp_path):
    x, y = make_data(32)
    m, plastic = build("ghl", x)
    seen = {}
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.setdefault(
            "groups",
            [
                (g["lr"], g["weight_decay"], g["momentum"], {id(p) for p in g["params"]})
                for g in self.param_groups
            ],
        )
        return orig(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", spy)
        res = train(
            m,
            x,
            y,
            x,
            y,
            plastic=plastic,
            epochs=2,
            batch_size=8,
            lr=0.1,
            lr_plastic=0.2,
            wd_plastic=0.3,
            wd=0.01,
            out_dir=tmp_path,
            progress=False,
        )
    params = dict(m.named_parameters())
    (lr0, wd0, mo0, ids0), (lr1, wd1, mo1, ids1) = seen["groups"]
    assert (lr0, wd0, mo0, lr1, wd1, mo1) == (0.1, 0.01, 0.0, 0.2, 0.3, 0.0)
    assert ids1 == {id(params[k]) for k in plastic}
    assert ids0 == {id(p) for k, p in params.items() if k not in plastic}
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["scheduler"]["T_max"] == 2 * 4 and ck["scheduler"]["last_epoch"] == 8
    assert res.final["lr"] < 0.1 and ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0)


@pytest.mark.parametrize("kind", ["ghl", "bp"])
def test_resume_is_bit_identical(tmp_path, kind):
    full, _ = run(kind, tmp_path / "full", epochs=3)

    # stop during epoch 2 (Ctrl-C from the model's forward), then resume to 3
    x, _ = make_data()
    m, plastic = build(kind, x)
    calls = {"n": 0}

    def bomb(mod, args):
        calls["n"] += 1
        if calls["n"] == 1 + 4 + 1 + 3:  # the label check's probe, 4 steps + 1 eval batch
            # in epoch 1; then step 3
            raise KeyboardInterrupt

    h = m.register_forward_pre_hook(bomb)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at epoch 2 step 3; resume with"):
        run(kind, tmp_path / "broken", epochs=3, model=m)
    h.remove()
    assert torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["epoch"] == 1

    torch.manual_seed(1234)  # a different global RNG state must not matter
    x, _ = make_data()
    m2, _ = build(kind, x)
    _, res = run(kind, tmp_path / "broken", epochs=3, resume=True, model=m2)
    assert res.epochs_run == 3
    assert_identical(state(full), state(m2))
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    broken_lines = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(s).items() if k not in ("seconds", "images_per_s")}
        for s in (full_lines, broken_lines)
        for s in s
    ]
    assert strip[:3] == strip[3:]


def test_resume_after_completed_epoch(tmp_path):
    """Stopped cleanly after epoch 1 (Ctrl-C during the epoch-2 eval) then resumed."""
    full, _ = run("bp", tmp_path / "full", epochs=2)
    x, _ = make_data()
    m, _ = build("bp", x)
    orig = T.evaluate
    n = {"k": 0}

    def eval_bomb(*a, **k):
        n["k"] += 1
        if n["k"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "evaluate", eval_bomb)
        with pytest.raises(TrainingInterrupted, match="epoch 2 step 4"):
            run("bp", tmp_path / "b", epochs=2, model=m)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    m2, _ = build("bp", x)
    run("bp", tmp_path / "b", epochs=2, resume=True, model=m2)
    assert_identical(state(full), state(m2))


def test_resume_extends_run(tmp_path):
    _, r1 = run("bp", tmp_path, epochs=1)
    x, _ = make_data()
    m, _ = build("bp", x)
    _, r2 = run("bp", tmp_path, epochs=3, resume=True, model=m)
    assert r2.epochs_run == 3 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["scheduler"]["T_max"] == 12 and ck["optimizer"]["param_groups"][0]["lr"] < 1e-6
    # nothing left to do: returns the stored result
    m3, _ = build("bp", x)
    _, r3 = run("bp", tmp_path, epochs=3, resume=True, model=m3)
    assert r3.final == r2.final and r3.epochs_run == 3


def test_resume_errors(tmp_path):
    with pytest.raises(GHLError, match="no checkpoint"):
        run("bp", tmp_path, resume=True)
    (tmp_path / "last.pt").write_bytes(b"junk")
    with pytest.raises(GHLError, match="not a ghlc checkpoint"):
        run("bp", tmp_path, resume=True)
    torch.save({"format": "ghlc-checkpoint", "version": 99}, tmp_path / "last.pt")
    with pytest.raises(GHLError, match="newer"):
        run("bp", tmp_path, resume=True)
    x, y = make_data(32)
    with pytest.raises(GHLError, match="not in the model"):
        train(make_model(), x, y, x, y, plastic={"nope.weight"}, out_dir=tmp_path, progress=False)


def test_labels_checked_before_any_file(tmp_path):
    x, y = make_data(32)
    for bad, msg in (
        (N_CLASSES, "out of range: the model gives 3 outputs"),
        (-1, "negative label"),
    ):
        y2 = y.clone()
        y2[7] = bad
        m, plastic = build("ghl", x)
        before = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(GHLError, match=msg):
            train(m, x, y2, x, y, plastic=plastic, out_dir=tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
        assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
        assert m.training


@pytest.mark.parametrize("how", ["lr", "nan_input"])
def test_divergence(tmp_path, how):
    x, y = make_data()
    m, plastic = build("ghl", x)
    kw = {"lr": 1e30, "lr_plastic": 1e30} if how == "lr" else {}
    if how == "nan_input":
        run("ghl", tmp_path, epochs=1, model=m)  # one good epoch first
        x = x.clone()
        x[5] = float("nan")
    good = (tmp_path / "last.pt").read_bytes() if how == "nan_input" else None
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch \d+ step \d+"):
        kw.setdefault("lr", 0.05)
        kw.setdefault("lr_plastic", 0.05)
        train(
            m,
            x,
            y,
            x,
            y,
            plastic=plastic,
            epochs=2,
            batch_size=16,
            out_dir=tmp_path,
            resume=how == "nan_input",
            progress=False,
            **kw,
        )
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    if good is not None:
        assert (tmp_path / "last.pt").read_bytes() == good
    else:
        assert ck["epoch"] == 0


def test_divergence_checked_every_few_steps(tmp_path, monkeypatch):
    """On an accelerator the loss is read back every few steps; the same path, forced on CPU:
    a NaN at step 1 is reported at the first check, and last.pt keeps the good epoch."""
    import ghlc.train as tr

    monkeypatch.setattr(tr, "_finite_check_every", lambda dev: 4)
    x, y = make_data()
    m, plastic = build("ghl", x)
    run("ghl", tmp_path, epochs=1, model=m)
    good = (tmp_path / "last.pt").read_bytes()
    x = x.clone()
    x[:] = float("nan")
    with pytest.raises(
        TrainingDiverged,
        match=r"epoch 2 step 4 \(or up to 3 steps before it; "
        r"checked every 4 steps\): the loss is not finite",
    ):
        train(
            m,
            x,
            y,
            x,
            y,
            plastic=plastic,
            epochs=2,
            batch_size=16,
            out_dir=tmp_path,
            resume=True,
            progress=False,
            lr=0.05,
            lr_plastic=0.05,
        )
    assert (tmp_path / "last.pt").read_bytes() == good


def test_evaluate(tmp_path):
    x, y = make_data(100)
    m = make_model()
    m.train()
    r = evaluate(m, x, y, batch_size=32, classes=["a", "b", "c", "d"])
    assert m.training  # mode restored
    assert set(r) == {"loss", "acc", "per_class"} and 0 <= r["acc"] <= 1
    assert list(r["per_class"]) == ["a", "b", "c", "d"]
    assert r["per_class"]["d"] != r["per_class"]["d"]  # no samples: NaN
    with torch.no_grad():
        m.eval()
        logits = m(x)
    assert r["acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert r["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert set(evaluate(m, x, y)["per_class"]) == set(y.tolist())


def test_augment_and_progress(tmp_path, capsys):
    seen = []

    def aug(xb, g):
        assert isinstance(g, torch.Generator)
        seen.append(xb.shape[0])
        return xb + 0.01 * torch.randn(xb.shape, generator=g)

    x, y = make_data(64)
    train(
        make_model(),
        x,
        y,
        x,
        y,
        plastic=set(),
        epochs=1,
        batch_size=16,
        out_dir=tmp_path,
        augment=aug,
        progress=True,
    )
    assert seen == [16] * 4
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "img_s" in err


def test_autocast_training_step(tmp_path):
    """train(autocast=torch.bfloat16): one step equals a hand-written SGD step with the
    forward and loss under bfloat16 autocast (and not the float32 step); float16 is refused."""
    x, y = make_data(1)

    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        return ghlc.prepare(m, (x,))

    m = net()
    plastic = set(runtime_of(m).sites)
    train(
        m,
        x,
        y,
        None,
        None,
        plastic=plastic,
        epochs=1,
        batch_size=1,
        out_dir=tmp_path,
        progress=False,
        lr=0.05,
        lr_plastic=0.1,
        autocast=torch.bfloat16,
    )
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["hparams"]["autocast"] == "bfloat16"

    def manual(amp: bool) -> dict:
        h = net()
        groups = [
            [p for n, p in h.named_parameters() if n not in plastic],
            [p for n, p in h.named_parameters() if n in plastic],
        ]
        opt = torch.optim.SGD(
            [
                {"params": groups[0], "lr": 0.05, "weight_decay": 0.0},
                {"params": groups[1], "lr": 0.1, "weight_decay": 5e-2},
            ]
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(h(x), y)
        loss.backward()
        opt.step()
        return state(h)

    assert_identical(state(m), manual(True))
    assert not torch.equal(state(m)["0.weight"], manual(False)["0.weight"])
    with pytest.raises(GHLError, match="use torch.bfloat16"):
        train(
            net(),
            x,
            y,
            None,
            None,
            plastic=plastic,
            out_dir=tmp_path / "b",
            progress=False,
            autocast=torch.float16,
        )
    assert not (tmp_path / "b").exists()  # refused before any file is written


@pytest.mark.parametrize("kind", ["ghl", "bp"])
def test_channels_last_training(tmp_path, kind, monkeypatch):
    """train(channels_last=True): the model's conv weights and every batch its forward sees
    are channels-last, the run is recorded as such, and it trains the same model as the
    standard layout up to float32 rounding (measured about 1e-8 of the weights' norm)."""
    seen = []
    real = T._layout

    def spy(x, channels_last):
        out = real(x, channels_last)
        seen.append(channels_last and out.is_contiguous(memory_format=torch.channels_last))
        return out

    def model():  # (no dropout: its mask is drawn in memory order, so layouts differ there)
        m = make_model()
        m[4] = nn.Identity()
        return ghlc.prepare(m, (make_data()[0][:1],)) if kind == "ghl" else m

    monkeypatch.setattr(T, "_layout", spy)
    ref, _ = run(kind, tmp_path / "nchw", epochs=2, model=model())
    assert seen and not any(seen)
    seen.clear()
    m, res = run(kind, tmp_path / "cl", epochs=2, model=model(), channels_last=True)
    assert seen and all(seen)
    convs = [p for p in m.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not convs[1].is_contiguous()  # (4 -> 4 channels: the layouts differ)
    ck = torch.load(tmp_path / "cl" / "last.pt", weights_only=True)
    assert ck["hparams"]["channels_last"] is True
    a, b = state(ref), state(m)
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).norm() <= 1e-4 * a[k].norm(), k
    assert abs(res.final["test_acc"] - T.evaluate(ref, *make_data(32, seed=1))["acc"]) <= 0.1


def test_cuda_graph_loop_matches_eager_loop(tmp_path, monkeypatch):
    """train(cuda_graph=True) replays the captured step for full batches and runs a smaller
    last batch eagerly. With the capture replaced by a CPU stand-in that keeps its contract
    (static input buffers; forward, loss and backward per call; the optimiser left to the
    loop), the run is bit-identical to the eager loop: the loop's replay branch, its logits
    and loss accounting, the eager last batch and the schedule are the same."""
    calls = {"capture": 0, "replay": 0}

    def stand_in(model, opt, loss_fn, x, y, autocast):
        calls["capture"] += 1
        assert x.shape[0] == 24 and autocast is None
        static_x, static_y = x.clone(), y.clone()

        def step(xb, target):
            calls["replay"] += 1
            static_x.copy_(xb)
            static_y.copy_(target)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(static_x), static_y)
            loss.backward()
            return loss

        return step

    for kind in ("ghl", "bp"):
        m_e, r_e = run(kind, tmp_path / f"{kind}_eager", epochs=2, batch_size=24)
        monkeypatch.setattr(T, "_capture", stand_in)
        m_g, r_g = run(kind, tmp_path / f"{kind}_graph", epochs=2, batch_size=24, cuda_graph=True)
        monkeypatch.undo()
        assert_identical(state(m_e), state(m_g))
        for a, b in zip(r_e.history, r_g.history, strict=True):
            for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "lr_plastic"):
                assert a[k] == b[k], k
    assert calls == {"capture": 2, "replay": 2 * 2 * 2}  # 64 samples: 24 + 24 (+ 16 eager)
    ck = torch.load(tmp_path / "ghl_graph" / "last.pt", weights_only=True)
    assert ck["hparams"]["cuda_graph"] is True


def test_cuda_graph_needs_cuda(tmp_path):
    x, y = make_data()
    m, plastic = build("ghl", x)
    with pytest.raises(GHLError, match="cuda_graph needs the model on a CUDA device"):
        train(
            m,
            x,
            y,
            None,
            None,
            plastic=plastic,
            out_dir=tmp_path / "g",
            progress=False,
            cuda_graph=True,
        )
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("native", [True, False, None])
def test_slow_bfloat16_cpu_warning(tmp_path, monkeypatch, native):
    """bfloat16 autocast on a CPU without native bfloat16 kernels warns (once per run) that it
    runs on slow fallback kernels; with native support, or when torch cannot tell, it does
    not; float32 training never does."""
    import warnings

    from ghlc.errors import SlowPrecisionWarning

    monkeypatch.setattr(T, "_cpu_native_bf16", lambda: native)
    x, y = make_data(8)
    for amp in (torch.bfloat16, None):
        m, plastic = build("ghl", x)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            train(
                m,
                x,
                y,
                None,
                None,
                plastic=plastic,
                epochs=1,
                batch_size=8,
                out_dir=tmp_path / str(amp),
                progress=False,
                autocast=amp,
            )
        slow = [w for w in got if issubclass(w.category, SlowPrecisionWarning)]
        assert len(slow) == (native is False and amp is not None)
        if slow:
            assert "slow fallback kernels" in str(slow[0].message)
    assert T.slow_bf16(torch.device("cuda")) is None


# ---- TrainConfig and Trainer ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, msg",
    [
        ("epochs", 0, "epochs must be >= 1, got 0"),
        ("epochs", 1.5, "epochs must be an integer, got 1.5"),
        ("batch_size", -2, "batch_size must be >= 1, got -2"),
        ("batch_size", True, "batch_size must be an integer, got True"),
        ("seed", "0", "seed must be an integer, got '0'"),
        ("lr", -0.1, "lr must be a finite number >= 0, got -0.1"),
        ("lr_plastic", float("nan"), "lr_plastic must be a finite number >= 0, got nan"),
        ("wd", "big", "wd must be a number, got 'big'"),
        ("wd_plastic", float("inf"), "wd_plastic must be a finite number >= 0, got inf"),
        (
            "autocast",
            torch.float16,
            "autocast torch.float16 is not supported here: use torch.bfloat16",
        ),
        ("augment", 3, "augment must be a function (x, generator) -> x, got int"),
        ("plastic", "0.weight", "plastic must be a set of parameter names, got str"),
        ("plastic", {1}, "plastic must be a set of parameter names (strings)"),
        ("out_dir", None, "out_dir must be a path, got NoneType"),
    ],
)
def test_train_config_rejects_a_bad_setting_in_one_line(tmp_path, field, value, msg):
    kw = {"out_dir": tmp_path / "run", "plastic": set(), field: value}
    with pytest.raises(GHLError) as e:
        T.TrainConfig(**kw)
    assert str(e.value) == msg and "\n" not in str(e.value)
    # train() checks the same settings before it writes anything
    x, y = make_data(8)
    with pytest.raises(GHLError, match=re.escape(msg)):
        train(
            make_model(),
            x,
            y,
            None,
            None,
            progress=False,
            **{"out_dir": tmp_path / "run", "plastic": set(), field: value},
        )
    assert not (tmp_path / "run").exists()


def test_train_config_is_frozen_and_normalised(tmp_path):
    cfg = T.TrainConfig(out_dir=str(tmp_path), plastic=["0.weight"], classes=["a", "b"])
    assert cfg.out_dir == tmp_path and cfg.plastic == frozenset({"0.weight"})
    assert cfg.classes == ("a", "b") and (cfg.epochs, cfg.batch_size, cfg.lr) == (1, 64, 5e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert cfg.hparams() == {
        "batch_size": 64,
        "seed": 0,
        "epochs": 1,
        "lr": 5e-3,
        "lr_plastic": 1e-2,
        "wd": 0.0,
        "wd_plastic": 5e-2,
        "autocast": None,
        "cuda_graph": False,
        "channels_last": False,
        "max_steps": None,
        "eval_batches": None,
        "plastic_step": "paper",
    }


def test_train_takes_exactly_the_config_settings():
    """train()'s keywords are TrainConfig's fields with the same defaults, so the wrapper and
    the config cannot drift apart."""
    params = inspect.signature(train).parameters
    kw = {
        k: None if p.default is inspect.Parameter.empty else p.default
        for k, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    fields = {
        f.name: None if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(T.TrainConfig)
    }
    assert kw == fields and kw["plastic"] is None and kw["epochs"] == 1  # (required; defaults)


def _trainer(kind, out, epochs=2, resume=False):
    x, y = make_data()
    xt, yt = make_data(32, seed=1)
    m, plastic = build(kind, x)
    cfg = T.TrainConfig(
        out_dir=out,
        plastic=plastic,
        epochs=epochs,
        batch_size=16,
        lr=0.05,
        lr_plastic=0.05,
        resume=resume,
        progress=False,
    )
    t = T.Trainer(m, cfg)
    t.setup(x, y, xt, yt)
    return t


def _sched_state(t):
    return copy.deepcopy(t.scheduler.state_dict())


@pytest.mark.parametrize("kind", ["ghl", "bp"])
def test_trainer_two_epochs_equal_one_then_resume_then_one(tmp_path, kind):
    """Two epochs in one Trainer end with the same weights, optimiser and schedule state as one
    epoch, a new Trainer resumed from last.pt, and one more epoch; right after the resume the
    schedule is where the unbroken run's was after its first epoch."""
    full = _trainer(kind, tmp_path / "full")
    full.start()
    full.run_epoch(1)
    after_one = _sched_state(full)
    full.run_epoch(2)

    first = _trainer(kind, tmp_path / "split")
    first.start()
    first.run_epoch(1)
    torch.manual_seed(1234)  # a different global RNG state must not matter
    second = _trainer(kind, tmp_path / "split", resume=True)
    second.resume(T.load_checkpoint(tmp_path / "split" / "last.pt"))
    assert second.epoch == 1 and _sched_state(second) == after_one
    second.run_epoch(2)
    res = second.result()

    assert res.epochs_run == 2
    assert_identical(state(full.model), state(second.model))
    assert _sched_state(second) == _sched_state(full)
    assert_identical(full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"])
    for a, b in zip(full.history, res.history, strict=True):
        assert {k: v for k, v in a.items() if k not in ("seconds", "images_per_s")} == {
            k: v for k, v in b.items() if k not in ("seconds", "images_per_s")
        }


def test_resume_writes_no_scheduler_attribute(tmp_path, monkeypatch):
    """Resuming a run with more epochs re-plans the cosine over the new total without ghlc
    writing any attribute of the scheduler (only torch's own methods do): the schedule then
    stands at the new span's position, as its state_dict says."""
    _trainer("bp", tmp_path, epochs=1).fit(*make_data(), *make_data(32, seed=1))
    written = []
    real = torch.optim.lr_scheduler.CosineAnnealingLR.__setattr__

    def spy(self, name, value):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("ghlc"):
            written.append((caller, name))
        real(self, name, value)

    monkeypatch.setattr(torch.optim.lr_scheduler.CosineAnnealingLR, "__setattr__", spy)
    t = _trainer("bp", tmp_path, epochs=3, resume=True)
    t.resume(T.load_checkpoint(tmp_path / "last.pt"))
    assert written == []
    sd = t.scheduler.state_dict()
    assert (sd["T_max"], sd["last_epoch"]) == (12, 4)
    want = [0.05 * (1 + math.cos(math.pi * 4 / 12)) / 2] * 2
    assert t.scheduler.get_last_lr() == pytest.approx(want, rel=1e-12)
    assert [g["lr"] for g in t.optimizer.param_groups] == t.scheduler.get_last_lr()
    res = t.fit(*make_data(), *make_data(32, seed=1))
    assert written == [] and res.epochs_run == 3
    assert t.scheduler.state_dict()["last_epoch"] == 12
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)

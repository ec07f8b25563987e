"""The benchmark scripts run end to end on CPU and report what their tables claim."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _step_module():
    spec = importlib.util.spec_from_file_location("_bench_step", BENCH / "step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_naive_baseline_computes_ghlc_rule():
    # The paper's-way baseline must compute the same update as ghlc (else the bench compares
    # different work): plain, strided, grouped and depthwise convs, per-layer temperatures.
    import copy

    import torch.nn as nn

    import ghlc

    spec = importlib.util.spec_from_file_location("_bench_naive", BENCH / "naive_ghl.py")
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=False), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    temps = {"0": 1.0, "3": 0.7, "5": 1.3, "8": 0.5}
    x, y = torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 2, 4])
    ref = copy.deepcopy(base)
    hooks = naive.NaiveGHL(ref, temps)
    nn.functional.cross_entropy(ref(x), y).backward()
    hooks.apply()
    m = ghlc.prepare(copy.deepcopy(base), (x[:2],), ghlc.GHLConfig(temperature=temps))
    nn.functional.cross_entropy(m(x), y).backward()
    got = dict(m.named_parameters())
    for name in temps:
        w_ref, w = ref.get_submodule(name).weight.grad, got[f"{name}.weight"].grad
        assert torch.allclose(w, w_ref, rtol=1e-4, atol=1e-6), name
        assert (w_ref != 0).float().mean() > 0.5, name  # a real update, not all zeros


def test_quartiles():
    q = _step_module().quartiles
    assert q([3.0]) == (3.0, 3.0, 3.0)
    assert q([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.5, 3.0, 4.5)  # halves without the median
    assert q([4.0, 1.0, 3.0, 2.0]) == (1.5, 2.5, 3.5)
    xs = [1.3, 0.9, 1.1, 1.7, 1.0, 1.2, 1.05]
    lo, mid, hi = q(xs)
    assert lo <= mid <= hi and mid == statistics.median(xs)


def test_sampled_rows_take_the_sampled_block():
    rows = _step_module().sampled_rows
    t = torch.arange(64 * 3.0).view(64, 3)
    assert torch.equal(rows(t, 0.25), t[:16])
    assert rows(t, 1.0) is t and rows(t[:2], 0.25).shape == (1, 3)  # at least one row


def test_channels_last_runs_build_every_tensor_channels_last(monkeypatch):
    """--channels-last: the models' conv weights, the input and the kernel-floor probes'
    tensors (the sampled block too) are channels-last; without it all stay as they were."""
    step = _step_module()
    cl = torch.channels_last
    for on in (False, True):
        monkeypatch.setattr(step, "CHANNELS_LAST", on)
        m, temp = step.build("fasthebb")
        x, _ = step.data(8, 32, 10, "cpu")
        fmt = cl if on else torch.contiguous_format
        convs = [p for p in m.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
        assert any(p.is_contiguous() for p in convs) != on
        assert x.is_contiguous(memory_format=fmt) and x.is_contiguous() != on
        probes, _ = step.kernel_probes(m, temp, x, "cpu", frac=0.25)
        for pr in [pr for pr in probes if pr["kind"] != "linear"]:
            cot, xi, w, _ = pr["fn"].__defaults__
            assert cot.shape[0] == xi.shape[0] == 2  # the sampled block of the batch
            for a in (cot, xi, w):
                assert a.is_contiguous(memory_format=fmt)
    t = torch.randn(8, 4, 3, 3).contiguous(memory_format=cl)
    assert step.sampled_rows(t, 0.25).is_contiguous(memory_format=cl)


def test_machine_names_the_cpu_kernels(monkeypatch):
    step = _step_module()
    cap = torch.backends.cpu.get_cpu_capability()
    assert f"; {cap}" in step.machine("cpu")
    monkeypatch.setattr(step, "_cpu_native_bf16", lambda: False)
    assert step.cpu_kernels() == f"; {cap}, no native bfloat16"
    monkeypatch.setattr(step, "_cpu_native_bf16", lambda: None)
    assert step.cpu_kernels() == f"; {cap}"


def test_median_ci():
    ci = _step_module().median_ci
    # published distribution-free 95 % intervals: ranks (2, 8) of 9, (8, 18) of 25, (18, 33) of 50
    for n, (j, k) in {9: (2, 8), 25: (8, 18), 50: (18, 33)}.items():
        lo, hi, cover = ci([float(i) for i in range(n, 0, -1)])  # unsorted input
        assert (lo, hi) == (j, k)
        # coverage = P(j <= Binomial(n, 1/2) <= n - j), summed the other way round
        assert cover == pytest.approx(sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2**n)
        assert cover >= 0.95
    assert ci([2.0, 1.0, 3.0])[:2] == (1.0, 3.0)  # too few for 95 %: the full range
    assert ci([2.0, 1.0, 3.0])[2] == pytest.approx(0.75)


def _run(args, tmp_path, timeout=240):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_step_bench_smoke(tmp_path):
    out = tmp_path / "step.json"
    text = _run([BENCH / "step.py", "--models", "fasthebb", "--repeats", "3", "--warmup", "0",
                 "--batch", "4", "--variants", "ghlc,ghlc_s25,ghlc_p25", "--no-prepare-bench",
                 "--json", out], tmp_path)
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"bp", "ghlc", "ghlc_s25", "ghlc_p25"}
    # the sampled kernel floors time the kernels on the sampled block (1 of the 4 samples)
    # and on the sampled grid of positions
    kern = res["kernels"]["fasthebb"]
    for key in ("sampled", "positions"):
        assert [lay["layer"] for lay in kern[key]["layers"]] == [
            lay["layer"] for lay in kern["layers"]]
    bp_ms = rows["bp"]["median_ms"]
    for v, k in (("ghlc", kern), ("ghlc_s25", kern["sampled"]),
                 ("ghlc_p25", kern["positions"])):
        assert rows[v]["hebbian_kernel_ms"] == pytest.approx(k["hebbian_kernel_ms"])
        assert rows[v]["kernel_floor"] == pytest.approx((bp_ms + k["hebbian_kernel_ms"]) / bp_ms)
    g = rows["ghlc"]
    assert len(g["times_ms"]) == 3 and len(rows["bp"]["times_ms"]) == 3
    paired = [a / b for a, b in zip(g["times_ms"], rows["bp"]["times_ms"])]
    q1, qm, q3 = g["paired_ratio_quartiles"]
    assert qm == pytest.approx(statistics.median(paired))
    assert min(paired) <= q1 <= qm <= q3 <= max(paired)
    assert g["ratio_to_floor_iqr"] == pytest.approx([q1 / g["floor"], q3 / g["floor"]])
    assert g["ratio_to_bp"] == pytest.approx(g["median_ms"] / rows["bp"]["median_ms"])
    assert 1.0 < g["floor"] < 2.0 and g["peak_mb"] > 0
    assert g["paired_ratio_median_ci"] == [min(paired), max(paired)]  # 3 repeats: full range
    assert g["ratio_to_floor_ci"] == pytest.approx([min(paired) / g["floor"],
                                                    max(paired) / g["floor"]])
    line = next(ln for ln in text.splitlines() if ln.startswith("| fasthebb | ghlc |"))
    assert f"{q1 / g['floor']:.3f}–{q3 / g['floor']:.3f}" in line
    assert f"{min(paired) / g['floor']:.3f}–{max(paired) / g['floor']:.3f}" in line


@pytest.mark.slow  # step.py's other variants: test_step_bench_smoke runs it by default
def test_step_bench_autocast_variants(tmp_path):
    """bp_amp is added as the reference of the autocast rows; ghlc_amp's kernel floor uses the
    float32 kernels, ghlc_amp_low's the bfloat16 ones; the graph variants need CUDA."""
    out = tmp_path / "step.json"
    text = _run([BENCH / "step.py", "--models", "fasthebb", "--repeats", "2", "--warmup", "0",
                 "--batch", "4", "--variants", "ghlc_amp,ghlc_amp_low", "--no-prepare-bench",
                 "--no-memory", "--json", out], tmp_path)
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"bp", "bp_amp", "ghlc_amp", "ghlc_amp_low"}
    # --no-memory: no probes, the memory columns empty in the JSON and the table
    assert res["memory_method"].startswith("not measured")
    assert all(r["peak_mb"] is None and r["mem_ratio"] is None for r in rows.values())
    line = next(ln for ln in text.splitlines() if ln.startswith("| fasthebb | ghlc_amp |"))
    assert line.endswith("| – | – |")
    kern = res["kernels"]["fasthebb"]
    amp_ms = rows["bp_amp"]["median_ms"]
    for v, k in (("ghlc_amp", kern), ("ghlc_amp_low", kern["amp_low"])):
        assert rows[v]["reference"] == "bp_amp"
        assert rows[v]["ratio_to_bp"] == pytest.approx(rows[v]["median_ms"] / amp_ms)
        assert rows[v]["kernel_floor"] == pytest.approx((amp_ms + k["hebbian_kernel_ms"]) / amp_ms)
    r = subprocess.run([sys.executable, BENCH / "step.py", "--variants", "ghlc_amp_graph"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "needs --device cuda" in r.stderr


@pytest.mark.slow  # step.py's other variants: test_step_bench_smoke runs it by default
def test_step_bench_channels_last_smoke(tmp_path):
    out = tmp_path / "step.json"
    text = _run([BENCH / "step.py", "--models", "fasthebb", "--repeats", "1", "--warmup", "0",
                 "--batch", "4", "--variants", "ghlc", "--no-prepare-bench", "--channels-last",
                 "--json", out], tmp_path)
    res = json.loads(out.read_text())
    assert res["memory_format"] == "channels_last" and "memory format: channels-last" in text
    assert {r["variant"] for r in res["rows"]} == {"bp", "ghlc"}
    assert all(r["peak_mb"] > 0 for r in res["rows"])


def test_layout_bench_smoke(tmp_path):
    """bench/layout.py: both layouts of every variant timed, paired ratios consistent with
    the per-repeat times."""
    out = tmp_path / "layout.json"
    text = _run([BENCH / "layout.py", "--models", "fasthebb", "--repeats", "3", "--warmup", "0",
                 "--batch", "4", "--json", out], tmp_path)
    res = json.loads(out.read_text())["models"][0]
    t = res["times_ms"]
    assert set(t) == {f"{v}_{lay}" for v in ("bp", "ghlc", "ghlc_s25") for lay in ("nchw", "cl")}
    assert all(len(v) == 3 for v in t.values())
    r = [a / b for a, b in zip(t["ghlc_cl"], t["bp_cl"])]
    assert res["ratio_to_bp"]["ghlc_cl"]["median"] == pytest.approx(statistics.median(r))
    assert res["ratio_to_bp"]["ghlc_cl"]["ci"] == pytest.approx([min(r), max(r)])
    r = [a / b for a, b in zip(t["bp_cl"], t["bp_nchw"])]
    assert res["cl_over_nchw"]["bp"]["median"] == pytest.approx(statistics.median(r))
    assert "| fasthebb | ghlc_s25 |" in text


def test_step_bench_rejects_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, BENCH / "step.py", "--variants", "ghlc_graph"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "needs --device cuda" in r.stderr
    r = subprocess.run([sys.executable, BENCH / "step.py", "--resnet50", "--no-memory"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "drop --no-memory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_overhead_bench_smoke(tmp_path):
    text = _run([BENCH / "overhead.py", "--layers", "3", "--steps", "5"], tmp_path)
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| ")]
    body = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}
    assert set(body) == {"bp", "ghlc", "ghlc_mode", "ghlc_fn", "ghlc_s50", "ghlc_fwd"}
    assert "3 plastic layers" in text
    # a plastic call adds operators and one convolution call (its Hebbian correlation) per
    # layer to bp's forward and backward one
    assert float(body["ghlc"][3]) > 0
    assert int(body["ghlc"][5]) == int(body["bp"][5]) + 3 == 9
    # ghlc_fwd: the tiny convs' correlation as a forward conv (transposes, crop, copy: more
    # operators), still one convolution call
    assert float(body["ghlc_fwd"][3]) > float(body["ghlc"][3])
    assert int(body["ghlc_fwd"][5]) == 9


def test_mlp_bench_smoke(tmp_path):
    text = _run([BENCH / "mlp.py", "--sizes", "16x4", "--repeats", "3"], tmp_path)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| MLP")]
    assert [r[2] for r in rows] == ["bp", "ghlc", "ghlc_wdot"]
    fl = (784 * 16 * 3 + 16 * 16 * 4 + 16 * 10 * 3) / (784 * 16 * 2 + 3 * (16 * 16 + 16 * 10))
    assert all(r[0] == "784-16-16-10" and r[1] == "4" for r in rows)
    for r in rows[1:]:
        assert float(r[6]) == pytest.approx(fl, 1e-3) and float(r[4]) > 0
    assert rows[0][4] == "1.000" and rows[0][6] == "–"
    bad = subprocess.run([sys.executable, BENCH / "mlp.py", "--sizes", "16"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "HIDDENxBATCH" in bad.stderr


def test_wgrad_stack_bench_smoke(tmp_path):
    text = _run([BENCH / "wgrad_stack.py", "--device", "cpu", "--model", "fasthebb", "--batch",
                 "2", "--repeats", "1"], tmp_path)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| layer")]
    assert [r[0] for r in rows] == [f"block{i}.conv.weight" for i in range(1, 5)] + ["sum"]
    for r in rows[:-1]:
        assert float(r[-1]) <= 1e-5  # the stacked call gives both weight gradients
        assert float(r[6]) == pytest.approx(float(r[4]) / float(r[3]), rel=1e-2)  # rounded
    sums = [sum(float(r[i]) for r in rows[:-1]) for i in (3, 4, 5)]
    assert [float(c) for c in rows[-1][3:6]] == pytest.approx(sums, abs=1e-3)


def test_wgrad_blocks_bench_smoke(tmp_path):
    text = _run([BENCH / "wgrad_blocks.py", "--device", "cpu", "--model", "fasthebb", "--batch",
                 "2", "--repeats", "1", "--units", "32,64"], tmp_path)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| layer")]
    assert [r[0] for r in rows] == [f"block{i}.conv.weight" for i in range(1, 5)]
    # stride-1 convs with a short sum (batch 2): the forward form, but for the first conv (3
    # input channels) and the last (8 M multiply-adds at batch 2)
    assert [r[2] for r in rows] == ["one", "fwd", "fwd", "one"]
    for r in rows:
        assert float(r[-1]) <= 1e-5  # every variant gives the same weight gradient
        assert float(r[5].split()[1].strip("()")) > 0  # the forward form ran
        assert r[6] != "–" and float(r[6].split()[1].strip("()")) > 0  # blocks of 32 ran


def test_wgrad_blocks_small_grid_smoke(tmp_path):
    text = _run([BENCH / "wgrad_blocks.py", "--device", "cpu", "--small", "--repeats", "1",
                 "--units", "64"], tmp_path)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| layer")]
    assert len(rows) == 36 and text.startswith("small 3x3 convs")
    for r in rows:
        assert float(r[-1]) <= 1e-5
        channels = int(r[1].split("x")[0])
        macs = float(r[0].split("(")[1].split()[0]) * 1e6
        fwd = channels >= 64 and macs >= 1 << 24  # (every case's sum is short enough)
        assert r[2] == ("fwd" if fwd else "one"), r


def test_rule_ops_bench_smoke(tmp_path):
    text = _run([BENCH / "rule_ops.py", "--device", "cpu", "--model", "fasthebb", "--batch",
                 "2", "--repeats", "1"], tmp_path)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| layer")]
    assert [r[0] for r in rows] == [*(f"block{i}.conv.weight" for i in range(1, 5)),
                                    "**all layers**"]
    for r in rows[:-1]:
        assert all(float(c) > 0 for c in r[2:7])
        assert float(r[7].split(" / ")[0]) < 1e-4  # ghlc's dots against float64


def test_profile_step_smoke(tmp_path):
    text = _run([BENCH / "profile_step.py", "--device", "cpu", "--model", "fasthebb", "--batch",
                 "2", "--steps", "1", "--top", "3", "--variants", "bp,ghlc"], tmp_path)
    assert "=== fasthebb bp:" in text and "=== fasthebb ghlc:" in text
    assert "aten::convolution_backward" in text
    r = subprocess.run([sys.executable, BENCH / "profile_step.py", "--device", "cpu",
                        "--variants", "ghlc_graph"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "needs --device cuda" in r.stderr


def test_grid_probe_is_the_runtime_call():
    """The positions kernel floor times the strided call the runtime makes: same shapes."""
    step = _step_module()
    from types import SimpleNamespace

    info = SimpleNamespace(in_shape=(4, 3, 9, 8), out_shape=(4, 5, 9, 8),
                           weight_shape=(5, 3, 3, 3))
    conv = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    xi, cot, args = step.grid_probe(info, conv, 0.25, {"dtype": torch.float32})
    assert xi.shape == (4, 3, 9, 8) and cot.shape == (4, 5, 5, 4)  # rows 0,2,..8; cols 0,..6
    assert args[0] == (2, 2) and args[1] == (1, 1)
    w = torch.randn(info.weight_shape)
    g = step.conv_weight_grad(cot, xi, w, args)
    assert g.shape == w.shape

"""The benchmark scripts run end to end on CPU and report what their tables claim; their
shared library (bench/benchlib) computes its statistics right and its variants name real
settings."""

import dataclasses
import importlib
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def lib(monkeypatch):
    """The bench/benchlib package, imported as the scripts import it (bench/ on the path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return SimpleNamespace(
        **{
            name: importlib.import_module(f"benchlib.{name}")
            for name in (
                "stats",
                "timing",
                "machine",
                "models",
                "variants",
                "runners",
                "layers",
                "naive_ghl",
            )
        }
    )


def _policy_wired() -> bool:
    """Whether the runtime reads the dispatch policy (and not its older module globals), so
    that a policy override changes what a step computes."""
    try:
        hebbian = importlib.import_module("ghlc.runtime.hebbian")
    except ImportError:
        return True
    return not hasattr(hebbian, "FORWARD_WGRAD_MIN_MACS")


def test_naive_baseline_computes_ghlc_rule(lib):
    # The paper's-way baseline must compute the same update as ghlc (else the bench compares
    # different work): plain, strided, grouped and depthwise convs, per-layer temperatures.
    import copy

    import torch.nn as nn

    import ghlc

    naive = lib.naive_ghl
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=False),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 6, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
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


def test_quartiles(lib):
    q = lib.stats.quartiles
    assert q([3.0]) == (3.0, 3.0, 3.0)
    assert q([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.5, 3.0, 4.5)  # halves without the median
    assert q([4.0, 1.0, 3.0, 2.0]) == (1.5, 2.5, 3.5)
    xs = [1.3, 0.9, 1.1, 1.7, 1.0, 1.2, 1.05]
    lo, mid, hi = q(xs)
    assert lo <= mid <= hi and mid == statistics.median(xs)


def test_sampled_rows_take_the_sampled_block(lib):
    rows = lib.layers.sampled_rows
    t = torch.arange(64 * 3.0).view(64, 3)
    assert torch.equal(rows(t, 0.25), t[:16])
    assert rows(t, 1.0) is t and rows(t[:2], 0.25).shape == (1, 3)  # at least one row


def test_channels_last_runs_build_every_tensor_channels_last(lib, monkeypatch):
    """--channels-last: the models' conv weights, the input and the kernel-floor probes'
    tensors (the sampled block too) are channels-last; without it all stay as they were."""
    cl = torch.channels_last
    for on in (False, True):
        monkeypatch.setattr(lib.models, "CHANNELS_LAST", on)
        m, temp = lib.models.build("fasthebb")
        x, _ = lib.models.data(8, 32, 10, "cpu")
        fmt = cl if on else torch.contiguous_format
        convs = [p for p in m.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
        assert any(p.is_contiguous() for p in convs) != on
        assert x.is_contiguous(memory_format=fmt) and x.is_contiguous() != on
        probes, _ = lib.layers.kernel_probes(m, temp, x, "cpu", frac=0.25)
        for pr in [pr for pr in probes if pr["kind"] != "linear"]:
            cot, xi, w, _ = pr["fn"].__defaults__
            assert cot.shape[0] == xi.shape[0] == 2  # the sampled block of the batch
            for a in (cot, xi, w):
                assert a.is_contiguous(memory_format=fmt)
    t = torch.randn(8, 4, 3, 3).contiguous(memory_format=cl)
    assert lib.layers.sampled_rows(t, 0.25).is_contiguous(memory_format=cl)


def test_machine_names_the_cpu_kernels_and_flags(lib, monkeypatch):
    mach = lib.machine
    cap = torch.backends.cpu.get_cpu_capability()
    assert f"; {cap}" in mach.machine("cpu")
    monkeypatch.setattr(mach, "_cpu_native_bf16", lambda: False)
    assert mach.cpu_kernels() == f"; {cap}, no native bfloat16"
    monkeypatch.setattr(mach, "_cpu_native_bf16", lambda: None)
    assert mach.cpu_kernels() == f"; {cap}"
    info = {"model name": "Some CPU", "flags": "fpu sse avx avx2 avx512f avx512bw"}
    monkeypatch.setattr(mach, "_cpuinfo", lambda: info)
    assert mach.cpu_flags() == ["AVX2", "AVX-512F"]
    assert f"(Some CPU; {cap}; flags AVX2 AVX-512F), " in mach.machine("cpu")
    rec = mach.machine_info("cpu")
    assert rec["cpu"] == "Some CPU" and rec["cpu_flags"] == ["AVX2", "AVX-512F"]
    assert rec["torch"] == torch.__version__ and rec["gpu"] is None
    info["flags"] = "fpu sse avx"  # an AVX-only CPU: no flag of the list
    assert mach.cpu_flags() == [] and f"(Some CPU; {cap}), " in mach.machine("cpu")


def test_median_ci(lib):
    ci = lib.stats.median_ci
    # published distribution-free 95 % intervals: ranks (2, 8) of 9, (8, 18) of 25, (18, 33) of 50
    for n, (j, k) in {9: (2, 8), 25: (8, 18), 50: (18, 33)}.items():
        lo, hi, cover = ci([float(i) for i in range(n, 0, -1)])  # unsorted input
        assert (lo, hi) == (j, k)
        # coverage = P(j <= Binomial(n, 1/2) <= n - j), summed the other way round
        assert cover == pytest.approx(sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2**n)
        assert cover >= 0.95
    assert ci([2.0, 1.0, 3.0])[:2] == (1.0, 3.0)  # too few for 95 %: the full range
    assert ci([2.0, 1.0, 3.0])[2] == pytest.approx(0.75)
    # a known sample: 11 paired ratios; the 95 % interval is their 2nd and 10th smallest
    # (coverage 1 - 2 * 12 / 2**11 = 0.98828125; the 3rd and 9th give 0.93457 < 0.95)
    xs = [1.07, 1.02, 0.99, 1.11, 1.04, 1.00, 1.21, 1.03, 0.97, 1.05, 1.06]
    assert ci(xs) == (0.99, 1.11, pytest.approx(0.98828125))


def test_paired_statistics(lib):
    st = lib.stats
    a, b = [2.0, 3.0, 4.5, 1.0, 6.0], [2.0, 2.0, 3.0, 2.0, 3.0]
    assert st.paired_ratios(a, b) == [1.0, 1.5, 1.5, 0.5, 2.0]
    # median 1.5; 5 samples are too few for 95 %: the full range with coverage 1 - 2/32
    assert st.paired_summary(a, b) == {
        "median": 1.5,
        "ci": [0.5, 2.0],
        "coverage": pytest.approx(0.9375),
    }
    with pytest.raises(ValueError, match="differ in length"):
        st.paired_ratios([1.0], [1.0, 2.0])
    assert st.mem_ratio(300, 200) == 1.5 and st.mem_ratio(None, 200) is None
    assert math.isnan(st.mem_ratio(1, 0))


def test_every_variant_overrides_real_policy_fields(lib):
    """Each variant's dispatch-policy overrides name DispatchPolicy fields with values of the
    field's kind, and apply; its GHLConfig settings are valid."""
    import ghlc
    from ghlc.runtime import policy

    fields = {f.name: f for f in dataclasses.fields(policy.DispatchPolicy)}
    base = policy.current()
    seen = set()
    for v in lib.variants.VARIANTS.values():
        for name, value in v.policy.items():
            assert name in fields, (v.name, name)
            default = getattr(base, name)
            if isinstance(default, tuple):  # device sets are tuples of device types
                assert isinstance(value, tuple) and all(d in ("cpu", "cuda") for d in value)
            elif default is not None:
                assert type(value) is type(default), (v.name, name, value)
            seen.add(name)
        with policy.override(**v.policy) as now:
            assert all(getattr(now, k) == val for k, val in v.policy.items())
        assert policy.current() == base
        ghlc.GHLConfig(**v.config)
        assert v.reference in lib.variants.VARIANTS, v.name
    assert {
        "forward_form_devices",
        "activity_sum_devices",
        "in_call_combine_devices",
        "stack_max_numel",
        "measure",
    } <= seen
    vt = lib.variants
    assert vt.variant("ghlc_wgrad").policy == {"forward_form_devices": ()}
    assert vt.variant("ghlc_static").policy == {"measure": False}
    assert vt.variant("ghlc_chunk_graph").policy == {"in_call_combine_devices": ("cpu", "cuda")}
    assert vt.variant("ghlc_stack20_graph").policy == {"stack_max_numel": 1 << 20}
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        vt.variant("nope")


def test_variant_table_keeps_the_default_sets(lib):
    vt = lib.variants
    assert vt.defaults_for("cpu") == ("bp", "naive", "ghlc", "ghlc_s25")
    assert vt.defaults_for("cuda") == (
        "bp",
        "naive",
        "ghlc",
        "ghlc_s25",
        "ghlc_ref",
        "bp_graph",
        "ghlc_graph",
        "ghlc_ref_graph",
        "ghlc_chunk_graph",
        "ghlc_s25_graph",
        "ghlc_p25_graph",
        "ghlc_stack_graph",
        "ghlc_stack20_graph",
    )
    assert [
        vt.reference(v)
        for v in ("ghlc", "ghlc_graph", "ghlc_amp", "ghlc_amp_low_graph", "ghlc_compile")
    ] == ["bp", "bp_graph", "bp_amp", "bp_amp_graph", "bp_compile"]
    kinds = {
        v: vt.variant(v).kernels
        for v in ("bp", "ghlc", "ghlc_s25_wgrad", "ghlc_p25_graph", "ghlc_amp_low")
    }
    assert kinds == {
        "bp": "",
        "ghlc": "full",
        "ghlc_s25_wgrad": "sampled",
        "ghlc_p25_graph": "positions",
        "ghlc_amp_low": "amp_low",
    }
    assert all(vt.variant(v).cuda_only for v in vt.graph_variants() + ("ghlc_ref",))


def test_every_variant_builds_its_model(lib):
    """Each variant's eager part (the model and optimiser a CUDA graph would capture) builds on
    CPU, as ghlc with its settings where it is a ghlc variant."""
    import torch.nn as nn

    import ghlc

    base = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    x = torch.randn(2, 3, 4, 4)
    for v in lib.variants.VARIANTS.values():
        if v.compiled:
            continue  # torch.compile builds lazily, at its first step
        r = lib.runners.Runner(base, 1.0, v, x)
        prepared = ghlc.runtime.runtime_of(r.model) is not None
        assert prepared == (v.method == "ghlc"), v.name
        assert (r.naive is not None) == (v.method == "naive"), v.name
        assert r.fused == (v.fused or ghlc.runtime.fused.mode()), v.name


def test_first_step_reports_the_measuring_time(lib, monkeypatch):
    """Where ghlc measures kernels, the first step's measuring seconds are read after a reset;
    without the measuring module they are None (shown as "–")."""
    import ghlc.runtime

    calls = []

    class FakeMeasure:
        @staticmethod
        def reset():
            calls.append("reset")

        @staticmethod
        def stats():
            calls.append("stats")
            return SimpleNamespace(seconds=0.25)

    class Counting:
        def step(self, x, y):
            calls.append("step")

    monkeypatch.setitem(sys.modules, "ghlc.runtime.measure", FakeMeasure)
    monkeypatch.setattr(ghlc.runtime, "measure", FakeMeasure, raising=False)
    x = torch.zeros(2)
    r, sec = lib.runners.first_step(lambda: calls.append("build") or Counting(), x, x, "cpu")
    assert isinstance(r, Counting) and sec == 0.25
    assert calls == ["reset", "build", "step", "stats"]
    monkeypatch.setitem(sys.modules, "ghlc.runtime.measure", None)  # import fails
    monkeypatch.delattr(ghlc.runtime, "measure")
    calls.clear()
    _, sec = lib.runners.first_step(Counting, x, x, "cpu")
    assert sec is None and calls == ["step"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("|")[1:-1]]


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of a printed markdown table's rows, its header row (starting ``header``) left
    out."""
    return [
        [c.strip() for c in ln.split("|")[1:-1]]
        for ln in text.splitlines()
        if ln.startswith("| ") and not ln.startswith(f"| {header}")
    ]


def _run(args, tmp_path, timeout=240):
    r = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_step_bench_smoke(tmp_path):
    out = tmp_path / "step.json"
    text = _run(
        [
            BENCH / "step.py",
            "--models",
            "fasthebb",
            "--repeats",
            "3",
            "--warmup",
            "0",
            "--batch",
            "4",
            "--variants",
            "ghlc,ghlc_s25,ghlc_p25,ghlc_static",
            "--no-prepare-bench",
            "--json",
            out,
        ],
        tmp_path,
    )
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"bp", "ghlc", "ghlc_s25", "ghlc_p25", "ghlc_static"}
    assert rows["ghlc_static"]["policy"] == {"measure": False} and rows["ghlc"]["policy"] == {}
    assert res["machine_info"]["torch"] == torch.__version__
    # the first step's kernel-measuring time, in its own column ("–" where ghlc has none)
    measuring = importlib.util.find_spec("ghlc.runtime.measure") is not None
    head = _cells(next(ln for ln in text.splitlines() if ln.startswith("| model |")))
    assert head[-1] == "measure s"
    for v, r in rows.items():
        cell = _cells(next(ln for ln in text.splitlines() if ln.startswith(f"| fasthebb | {v} |")))
        if measuring:
            assert r["measure_s"] >= 0 and cell[-1] == f"{r['measure_s']:.2f}"
        else:
            assert r["measure_s"] is None and cell[-1] == "–"
    # the sampled kernel floors time the kernels on the sampled block (1 of the 4 samples)
    # and on the sampled grid of positions
    kern = res["kernels"]["fasthebb"]
    for key in ("sampled", "positions"):
        assert [lay["layer"] for lay in kern[key]["layers"]] == [
            lay["layer"] for lay in kern["layers"]
        ]
    bp_ms = rows["bp"]["median_ms"]
    for v, k in (("ghlc", kern), ("ghlc_s25", kern["sampled"]), ("ghlc_p25", kern["positions"])):
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
    assert g["ratio_to_floor_ci"] == pytest.approx(
        [min(paired) / g["floor"], max(paired) / g["floor"]]
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("| fasthebb | ghlc |"))
    assert f"{q1 / g['floor']:.3f}–{q3 / g['floor']:.3f}" in line
    assert f"{min(paired) / g['floor']:.3f}–{max(paired) / g['floor']:.3f}" in line


@pytest.mark.slow  # step.py's other variants: test_step_bench_smoke runs it by default
def test_step_bench_autocast_variants(tmp_path):
    """bp_amp is added as the reference of the autocast rows; ghlc_amp's kernel floor uses the
    float32 kernels, ghlc_amp_low's the bfloat16 ones; the graph variants need CUDA."""
    out = tmp_path / "step.json"
    text = _run(
        [
            BENCH / "step.py",
            "--models",
            "fasthebb",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--batch",
            "4",
            "--variants",
            "ghlc_amp,ghlc_amp_low",
            "--no-prepare-bench",
            "--no-memory",
            "--json",
            out,
        ],
        tmp_path,
    )
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"bp", "bp_amp", "ghlc_amp", "ghlc_amp_low"}
    # --no-memory: no probes, the memory columns empty in the JSON and the table
    assert res["memory_method"].startswith("not measured")
    assert all(r["peak_mb"] is None and r["mem_ratio"] is None for r in rows.values())
    head = _cells(next(ln for ln in text.splitlines() if ln.startswith("| model |")))
    line = _cells(next(ln for ln in text.splitlines() if ln.startswith("| fasthebb | ghlc_amp |")))
    assert line[head.index("peak MB")] == line[head.index("mem ratio")] == "–"
    kern = res["kernels"]["fasthebb"]
    amp_ms = rows["bp_amp"]["median_ms"]
    for v, k in (("ghlc_amp", kern), ("ghlc_amp_low", kern["amp_low"])):
        assert rows[v]["reference"] == "bp_amp"
        assert rows[v]["ratio_to_bp"] == pytest.approx(rows[v]["median_ms"] / amp_ms)
        assert rows[v]["kernel_floor"] == pytest.approx((amp_ms + k["hebbian_kernel_ms"]) / amp_ms)
    r = subprocess.run(
        [sys.executable, BENCH / "step.py", "--variants", "ghlc_amp_graph"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "needs --device cuda" in r.stderr


@pytest.mark.slow  # step.py's other variants: test_step_bench_smoke runs it by default
def test_step_bench_channels_last_smoke(tmp_path):
    out = tmp_path / "step.json"
    text = _run(
        [
            BENCH / "step.py",
            "--models",
            "fasthebb",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--batch",
            "4",
            "--variants",
            "ghlc",
            "--no-prepare-bench",
            "--channels-last",
            "--json",
            out,
        ],
        tmp_path,
    )
    res = json.loads(out.read_text())
    assert res["memory_format"] == "channels_last" and "memory format: channels-last" in text
    assert {r["variant"] for r in res["rows"]} == {"bp", "ghlc"}
    assert all(r["peak_mb"] > 0 for r in res["rows"])


def test_layout_bench_smoke(tmp_path):
    """bench/layout.py: both layouts of every variant timed, paired ratios consistent with
    the per-repeat times."""
    out = tmp_path / "layout.json"
    text = _run(
        [
            BENCH / "layout.py",
            "--models",
            "fasthebb",
            "--repeats",
            "3",
            "--warmup",
            "0",
            "--batch",
            "4",
            "--json",
            out,
        ],
        tmp_path,
    )
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
    r = subprocess.run(
        [sys.executable, BENCH / "step.py", "--variants", "ghlc_graph"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "needs --device cuda" in r.stderr
    r = subprocess.run(
        [sys.executable, BENCH / "step.py", "--resnet50", "--no-memory"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
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
    assert int(body["ghlc_fwd"][5]) == 9
    if _policy_wired():  # the forward form is a dispatch-policy override
        assert float(body["ghlc_fwd"][3]) > float(body["ghlc"][3])


def test_mlp_bench_smoke(tmp_path):
    text = _run([BENCH / "mlp.py", "--sizes", "16x4", "--repeats", "3"], tmp_path)
    rows = _table_rows(text, "MLP")
    assert [r[2] for r in rows] == ["bp", "ghlc", "ghlc_wdot"]
    fl = (784 * 16 * 3 + 16 * 16 * 4 + 16 * 10 * 3) / (784 * 16 * 2 + 3 * (16 * 16 + 16 * 10))
    assert all(r[0] == "784-16-16-10" and r[1] == "4" for r in rows)
    for r in rows[1:]:
        assert float(r[6]) == pytest.approx(fl, 1e-3) and float(r[4]) > 0
    assert rows[0][4] == "1.000" and rows[0][6] == "–"
    bad = subprocess.run(
        [sys.executable, BENCH / "mlp.py", "--sizes", "16"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "HIDDENxBATCH" in bad.stderr


def test_wgrad_stack_bench_smoke(tmp_path):
    text = _run(
        [
            BENCH / "wgrad_stack.py",
            "--device",
            "cpu",
            "--model",
            "fasthebb",
            "--batch",
            "2",
            "--repeats",
            "1",
        ],
        tmp_path,
    )
    rows = _table_rows(text, "layer")
    assert [r[0] for r in rows] == [f"block{i}.conv.weight" for i in range(1, 5)] + ["sum"]
    for r in rows[:-1]:
        assert float(r[-1]) <= 1e-5  # the stacked call gives both weight gradients
        assert float(r[6]) == pytest.approx(float(r[4]) / float(r[3]), rel=1e-2)  # rounded
    sums = [sum(float(r[i]) for r in rows[:-1]) for i in (3, 4, 5)]
    assert [float(c) for c in rows[-1][3:6]] == pytest.approx(sums, abs=1e-3)


def test_wgrad_blocks_bench_smoke(tmp_path):
    text = _run(
        [
            BENCH / "wgrad_blocks.py",
            "--device",
            "cpu",
            "--model",
            "fasthebb",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--units",
            "32,64",
        ],
        tmp_path,
    )
    rows = _table_rows(text, "layer")
    assert [r[0] for r in rows] == [f"block{i}.conv.weight" for i in range(1, 5)]
    # stride-1 convs with a short sum (batch 2): the forward form, but for the first conv (3
    # input channels) and the last (8 M multiply-adds at batch 2)
    assert [r[2] for r in rows] == ["one", "fwd", "fwd", "one"]
    for r in rows:
        assert float(r[-1]) <= 1e-5  # every variant gives the same weight gradient
        assert float(r[5].split()[1].strip("()")) > 0  # the forward form ran
        assert r[6] != "–" and float(r[6].split()[1].strip("()")) > 0  # blocks of 32 ran


def test_wgrad_blocks_small_grid_smoke(tmp_path):
    text = _run(
        [
            BENCH / "wgrad_blocks.py",
            "--device",
            "cpu",
            "--small",
            "--repeats",
            "1",
            "--units",
            "64",
        ],
        tmp_path,
    )
    rows = _table_rows(text, "layer")
    assert len(rows) == 36 and text.startswith("small 3x3 convs")
    for r in rows:
        assert float(r[-1]) <= 1e-5
        channels = int(r[1].split("x")[0])
        macs = float(r[0].split("(")[1].split()[0]) * 1e6
        fwd = channels >= 64 and macs >= 1 << 24  # (every case's sum is short enough)
        assert r[2] == ("fwd" if fwd else "one"), r


def test_rule_ops_bench_smoke(tmp_path):
    text = _run(
        [
            BENCH / "rule_ops.py",
            "--device",
            "cpu",
            "--model",
            "fasthebb",
            "--batch",
            "2",
            "--repeats",
            "1",
        ],
        tmp_path,
    )
    rows = _table_rows(text, "layer")
    assert [r[0] for r in rows] == [
        *(f"block{i}.conv.weight" for i in range(1, 5)),
        "**all layers**",
    ]
    for r in rows[:-1]:
        assert all(float(c) > 0 for c in r[2:7])
        assert float(r[7].split(" / ")[0]) < 1e-4  # ghlc's dots against float64


def test_profile_step_smoke(tmp_path):
    text = _run(
        [
            BENCH / "profile_step.py",
            "--device",
            "cpu",
            "--model",
            "fasthebb",
            "--batch",
            "2",
            "--steps",
            "1",
            "--top",
            "3",
            "--variants",
            "bp,ghlc",
        ],
        tmp_path,
    )
    assert "=== fasthebb bp:" in text and "=== fasthebb ghlc:" in text
    assert "aten::convolution_backward" in text
    r = subprocess.run(
        [sys.executable, BENCH / "profile_step.py", "--device", "cpu", "--variants", "ghlc_graph"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "needs --device cuda" in r.stderr


def test_grid_probe_is_the_runtime_call(lib):
    """The positions kernel floor times the strided call the runtime makes: same shapes."""
    step = lib.layers
    info = SimpleNamespace(in_shape=(4, 3, 9, 8), out_shape=(4, 5, 9, 8), weight_shape=(5, 3, 3, 3))
    conv = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    xi, cot, args = step.grid_probe(info, conv, 0.25, {"dtype": torch.float32})
    assert xi.shape == (4, 3, 9, 8) and cot.shape == (4, 5, 5, 4)  # rows 0,2,..8; cols 0,..6
    assert args[0] == (2, 2) and args[1] == (1, 1)
    w = torch.randn(info.weight_shape)
    g = step.conv_weight_grad(cot, xi, w, args)
    assert g.shape == w.shape


@pytest.mark.slow  # two spawned processes
def test_distributed_bench_smoke(tmp_path):
    """bench/distributed.py: its table and JSON; ghl's bytes are backprop's gradients plus
    the raw H of every plastic (conv) weight and one flag per plastic weight, as counted on
    the hook's all-reduce calls."""
    out = tmp_path / "d.json"
    args = ["--models", "fasthebb", "--repeats", "1", "--warmup", "0", "--batch", "2"]
    _run([BENCH / "distributed.py", *args, "--json", out], tmp_path)
    rec = json.loads(out.read_text())
    (row,) = rec["rows"]
    sys.path.insert(0, str(BENCH))
    try:
        from benchlib.models import build
    finally:
        sys.path.remove(str(BENCH))
    model, _ = build("fasthebb")
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    grads = sum(p.numel() for p in model.parameters()) * 4
    assert row["bytes_bp"] == grads
    assert row["bytes_ghl"] == grads + sum(w.numel() for w in convs) * 4 + len(convs) * 4
    assert row["bp_ms"] > 0 and row["ghl_ms"] > 0 and row["quotient"] > 0

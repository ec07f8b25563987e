"""Who gets the step? Per plastic layer, how the GHL update is spread over output units.

    python bench/update_stats.py fasthebb-ghl-s0 fasthebb-bp-s0 fasthebb-ghl-norm-unit-s0

For each finished run of ``bench/accuracy.py`` (a folder in ``bench/runs/``) it loads the last
checkpoint into the GHL-prepared net (the run's own rule settings; a backprop or Hebbian run
gets the GHL rule, to show what GHL would do from its weights), takes one training step's
gradient on the first ``--images`` training images and prints, per plastic layer:

- the spread of the units' weight norms (median and max / median);
- ``units < 1%``: the share of output units whose largest step is below 1% of the layer's
  largest step (those units barely learn);
- ``mean step``: the mean |update| relative to the layer's largest.

With ``normalisation="layer"`` (the paper's rule) one unit with a large weight norm sets the
scale for all; docs/ACCURACY.md uses this table to explain where GHL's FastHebb runs stall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import accuracy  # bench/accuracy.py, beside this script: its runs, datasets and models
import torch


def stats(run: str, data_dir: Path, images: int, init: bool = False) -> list[tuple]:
    meta = accuracy.read_spec(accuracy.RUNS_DIR / run)
    ckpt_path = accuracy.RUNS_DIR / run / "last.pt"
    if meta is None or not ckpt_path.is_file():
        raise SystemExit(f"error: {run}: no finished run in {accuracy.RUNS_DIR / run}")
    spec = accuracy.RunSpec(**meta["settings"], epochs=meta["epochs"], section=meta["section"])
    x_tr, y_tr, *_ = accuracy.dataset(spec, data_dir)
    ghl_spec = accuracy.RunSpec(
        **{**meta["settings"], "method": "ghl"}, epochs=meta["epochs"], section=meta["section"]
    )
    model, plastic = accuracy.build(ghl_spec, tuple(x_tr.shape[1:]))
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["model"]
    if not init:
        model.load_state_dict(state)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x_tr[:images]), y_tr[:images])
    loss.backward()
    rows = []
    params = dict(model.named_parameters())
    for name in sorted(plastic):
        w, g = params[name].detach(), params[name].grad.abs()
        norms = w.flatten(1).norm(dim=1)
        unit_max = g.flatten(1).amax(1) / g.max()
        med = norms.median()
        rows.append(
            (
                run + (" (init)" if init else ""),
                name,
                med.item(),
                (norms.max() / med).item(),
                (unit_max < 0.01).float().mean().item(),
                (g.mean() / g.max()).item(),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folder names in bench/runs/")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--data-dir", type=Path, default=accuracy.DEFAULT_DATA_DIR)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--init",
        action="store_true",
        help="also show each run's net at its (seeded) initialisation",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| run | layer | median unit norm | max / median | units < 1% | mean step |")
    print("|---|---|---|---|---|---|")
    inits = (True, False) if args.init else (False,)
    for run, init in [(r, i) for r in args.runs for i in inits]:
        for r, name, med, spread, low, mean in stats(run, args.data_dir, args.images, init):
            print(f"| {r} | {name} | {med:.3f} | {spread:.1f} | {100 * low:.0f}% | {mean:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the train stage's Lightning loop against a plain PyTorch loop, in one run.

    make bench            (after `make pipeline`: uses data/prepared)
    python -m bench.train_vs_loop --smoke   (one epoch of each loop, once: does it run?)

Same network, data, batch size, optimiser and number of epochs; no validation in either, so
the figure is the training loop's own cost. Two figures for each loop:

- ``epoch``: samples/s within an epoch (the steady state a long training run lives in), timed
  from the epoch's start to its end, best epoch;
- ``total``: samples/s of the whole call, ``Trainer.fit`` set-up included (it weighs a lot in
  a 4-epoch run of 3,500 small images, and nothing in a real one).

The goal (Lightning / plain >= 0.95) is judged on the epoch figure. Results also go to
bench/results/train_vs_loop.json (``--smoke``, for tests/test_bench.py: one epoch, one repeat,
written to build/bench-smoke/ instead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from components.config import load_params
from components.dataset import DatasetMeta, load_arrays, meta_path, split_path
from components.lightning_module import lightning_module
from components.model import build_model
from components.recipe import resolve_for
from components.train import net_config

EPOCHS = 4
REPEATS = 7  # alternate the two loops and keep each one's best: less noise from the machine


def loader(x, y, batch_size: int, seed: int) -> DataLoader:
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(data, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def plain_loop(params, meta, train) -> tuple[float, float]:
    """(best epoch samples/s, total samples/s)."""
    torch.manual_seed(params.seed)
    net = build_model(net_config(meta, params, train.y))
    opt = torch.optim.Adam(net.parameters(), lr=params.learning_rate)
    data = loader(train.x, train.y, params.batch_size, params.seed)
    net.train()
    epochs = []
    start = time.perf_counter()
    for _ in range(EPOCHS):
        epoch_start = time.perf_counter()
        for xb, yb in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xb.float()), yb)
            loss.backward()
            opt.step()
        epochs.append(time.perf_counter() - epoch_start)
    total = time.perf_counter() - start
    return len(train) / min(epochs), len(train) * EPOCHS / total


def lightning_loop(params, meta, train) -> tuple[float, float]:
    """(best epoch samples/s, total samples/s), the train stage's own LightningModule."""
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(time.perf_counter() - self._start)

    torch.manual_seed(params.seed)
    net = build_model(net_config(meta, params, train.y))
    module = lightning_module(net, params)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    data = loader(train.x, train.y, params.batch_size, params.seed)
    start = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - start
    return len(train) / min(timer.seconds), len(train) * EPOCHS / total


def main(argv: list[str] | None = None) -> None:
    global EPOCHS, REPEATS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 1 repeat, in build/")
    args = parser.parse_args(argv)
    if args.smoke:
        EPOCHS, REPEATS = 1, 1
    all_params = load_params()
    meta = DatasetMeta.load(meta_path(all_params.paths.prepared_dir))
    # The train stage's network for this data (the recipe), with a plain optimiser and no
    # augmentation: the plain loop has neither.
    params = resolve_for(all_params.train, meta).params
    no_augment = {"crop_padding": 0, "max_rotation_degrees": 0.0, "horizontal_flip": False}
    params = params.model_copy(update={
        "optimizer": "adam", "lr_schedule": "none",
        "augment": params.augment.model_copy(update=no_augment),
    })  # fmt: skip
    train = load_arrays(split_path(all_params.paths.prepared_dir, "train"))
    torch.set_num_threads(torch.get_num_threads())
    plain, light = [], []
    for _ in range(REPEATS):
        plain.append(plain_loop(params, meta, train))
        light.append(lightning_loop(params, meta, train))
    best = {
        name: {kind: max(run[i] for run in runs) for i, kind in enumerate(("epoch", "total"))}
        for name, runs in (("plain", plain), ("lightning", light))
    }
    report = {
        "model": params.model,
        "train_images": len(train),
        "batch_size": params.batch_size,
        "epochs": EPOCHS,
        "threads": torch.get_num_threads(),
        "plain_samples_per_s": best["plain"]["epoch"],
        "lightning_samples_per_s": best["lightning"]["epoch"],
        "ratio_lightning_over_plain": best["lightning"]["epoch"] / best["plain"]["epoch"],
        # Each repeat runs the two loops back to back: the median of those paired ratios is
        # the figure least moved by another process's burst on a shared 2-core machine.
        "ratio_median_of_paired_repeats": statistics.median(
            lt[0] / pl[0] for pl, lt in zip(plain, light, strict=True)
        ),
        "total_with_setup": {
            "plain_samples_per_s": best["plain"]["total"],
            "lightning_samples_per_s": best["lightning"]["total"],
            "ratio_lightning_over_plain": best["lightning"]["total"] / best["plain"]["total"],
        },
        "all_runs": {"plain": plain, "lightning": light},
    }
    out = Path("build/bench-smoke" if args.smoke else "bench/results") / "train_vs_loop.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    total = report["total_with_setup"]
    print("                     within an epoch   whole call (set-up included)")
    print(f"plain PyTorch loop : {report['plain_samples_per_s']:9.0f} samples/s"
          f"   {total['plain_samples_per_s']:9.0f} samples/s")  # fmt: skip
    print(f"Lightning (train)  : {report['lightning_samples_per_s']:9.0f} samples/s"
          f"   {total['lightning_samples_per_s']:9.0f} samples/s")  # fmt: skip
    print(f"ratio (best of each): {report['ratio_lightning_over_plain']:8.3f} (goal >= 0.95)"
          f"   {total['ratio_lightning_over_plain']:9.3f}")  # fmt: skip
    print(f"ratio (median of {REPEATS} paired repeats, within an epoch): "
          f"{report['ratio_median_of_paired_repeats']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

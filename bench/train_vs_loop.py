"""Benchmark: the train stage's Lightning loop against a plain PyTorch loop, in one run.

    make bench            (after `make pipeline`: uses data/prepared)

Same network, data, batch size, optimiser and number of epochs; no validation in either, so
the figure is the training loop's own cost. Reports samples/s of each and the ratio
Lightning / plain (goal: >= 0.95). Results also go to bench/results/train_vs_loop.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from components.config import load_params
from components.dataset import DatasetMeta, load_images, meta_path, split_path
from components.model import build_model
from components.train import _lightning_module, net_config

EPOCHS = 3
REPEATS = 3  # alternate the two loops and keep each one's best: less noise from the machine


def loader(x, y, batch_size: int, seed: int) -> DataLoader:
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(data, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def plain_loop(params, meta, train) -> float:
    torch.manual_seed(params.seed)
    net = build_model(net_config(meta, params))
    opt = torch.optim.Adam(net.parameters(), lr=params.learning_rate)
    data = loader(train.x, train.y, params.batch_size, params.seed)
    net.train()
    start = time.perf_counter()
    for _ in range(EPOCHS):
        for xb, yb in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xb.float()), yb)
            loss.backward()
            opt.step()
    return len(train) * EPOCHS / (time.perf_counter() - start)


def lightning_loop(params, meta, train) -> float:
    import lightning as L

    torch.manual_seed(params.seed)
    net = build_model(net_config(meta, params))
    module = _lightning_module(net, params)
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    data = loader(train.x, train.y, params.batch_size, params.seed)
    start = time.perf_counter()
    trainer.fit(module, data)
    return len(train) * EPOCHS / (time.perf_counter() - start)


def main() -> None:
    all_params = load_params()
    params = all_params.train.model_copy(update={"optimizer": "adam", "lr_schedule": "none"})
    meta = DatasetMeta.load(meta_path(all_params.paths.prepared_dir))
    train = load_images(split_path(all_params.paths.prepared_dir, "train"))
    torch.set_num_threads(torch.get_num_threads())
    plain, light = [], []
    for _ in range(REPEATS):
        plain.append(plain_loop(params, meta, train))
        light.append(lightning_loop(params, meta, train))
    report = {
        "model": params.model,
        "train_images": len(train),
        "batch_size": params.batch_size,
        "epochs": EPOCHS,
        "threads": torch.get_num_threads(),
        "plain_samples_per_s": max(plain),
        "lightning_samples_per_s": max(light),
        "ratio_lightning_over_plain": max(light) / max(plain),
        "all_runs": {"plain": plain, "lightning": light},
    }
    out = Path("bench/results/train_vs_loop.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"plain PyTorch loop : {report['plain_samples_per_s']:9.0f} samples/s")
    print(f"Lightning (train)  : {report['lightning_samples_per_s']:9.0f} samples/s")
    print(f"ratio              : {report['ratio_lightning_over_plain']:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()

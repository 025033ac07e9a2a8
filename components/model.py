"""The networks as plain ``nn.Module`` s, and how their weights are stored on disk.

The Lightning wrapper (components/train.py) only adds the training loop, so evaluation,
compression and export work on these plain modules. Weights are saved as a state dict that
loads with ``torch.load(..., weights_only=True)``: no arbitrary pickle is read from disk.

Both families take raw pixel values 0-255 and scale them themselves, so exported models and
the served bento need no separate preprocessing step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild a network; stored in model.json beside the weights."""

    family: str  # "cnn" | "mlp"
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    channels: tuple[int, ...]  # CNN: one conv block per entry (ignored by the MLP)
    hidden_units: tuple[int, ...]  # fully connected hidden layers (the CNN's head, the MLP)
    dropout: float
    batch_norm: bool
    activation: str


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


class SmallCNN(nn.Module):
    """Conv blocks (3x3 conv, [batch norm], activation, 2x2 max-pool), then a dense head."""

    def __init__(self, config: NetConfig):
        super().__init__()
        in_channels, height, width = config.image_shape
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
                f"{config.image_shape[1]}x{config.image_shape[2]} image to nothing; use fewer"
            )
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(*_dense_stack(in_channels * height * width, config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x / 255.0))


class MLP(nn.Module):
    """Fully connected layers on the flattened image."""

    def __init__(self, config: NetConfig):
        super().__init__()
        c, h, w = config.image_shape
        self.classifier = nn.Sequential(*_dense_stack(c * h * w, config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x / 255.0)


FAMILIES = {"cnn": SmallCNN, "mlp": MLP}


def build_model(config: NetConfig) -> nn.Module:
    if config.family not in FAMILIES:
        raise ValueError(
            f"train.model: unknown model {config.family!r}; use one of {list(FAMILIES)}"
        )
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"train.activation: unknown {config.activation!r}")
    return FAMILIES[config.family](config)


def save_model(model: nn.Module, config: NetConfig, model_dir: Path, extra: dict) -> None:
    """Write the weights and a JSON description (architecture, class names, ...)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, model_dir / WEIGHTS_FILE)
    (model_dir / CONFIG_FILE).write_text(
        json.dumps({"config": asdict(config), **extra}, indent=2) + "\n"
    )


def config_from_dict(raw: dict) -> NetConfig:
    return NetConfig(
        family=raw["family"],
        image_shape=tuple(raw["image_shape"]),
        num_classes=raw["num_classes"],
        channels=tuple(raw["channels"]),
        hidden_units=tuple(raw["hidden_units"]),
        dropout=raw["dropout"],
        batch_norm=raw["batch_norm"],
        activation=raw["activation"],
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from our ``model.pt`` or a Lightning checkpoint, never unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:  # a Lightning checkpoint: the module's keys start with "net."
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    return state


def load_model(model_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild the network from ``model.json`` and load ``model.pt`` (weights only)."""
    model_dir = Path(model_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: run the train stage first")
    described = json.loads((model_dir / CONFIG_FILE).read_text())
    try:
        config = config_from_dict(described["config"])
    except KeyError as exc:
        raise ValueError(
            f"{model_dir / CONFIG_FILE} lacks {exc} (written by an older version?): "
            "re-run the train stage"
        ) from None
    model = build_model(config)
    model.load_state_dict(load_state_dict(model_dir / WEIGHTS_FILE))
    model.eval()
    return model, described


@torch.no_grad()
def predict_logits(model: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    """Logits for uint8/float images (N, C, H, W), in batches, on CPU."""
    model.eval()
    x = torch.as_tensor(x)
    out = [model(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)

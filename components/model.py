"""The networks as plain ``nn.Module`` s, and how their weights are stored on disk.

The Lightning wrapper (components/train.py) only adds the training loop, so evaluation,
compression and export work on these plain modules. Weights are saved as a state dict that
loads with ``torch.load(..., weights_only=True)``: no arbitrary pickle is read from disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"


@dataclass(frozen=True)
class CNNConfig:
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    channels: tuple[int, ...]
    hidden_units: int
    dropout: float


class SmallCNN(nn.Module):
    """Conv blocks (3x3 conv, ReLU, 2x2 max-pool), then one hidden layer and the classifier.

    Takes raw pixel values 0-255 and scales them itself, so exported models and the served
    bento need no separate preprocessing step.
    """

    def __init__(self, config: CNNConfig):
        super().__init__()
        in_channels, height, width = config.image_shape
        blocks: list[nn.Module] = []
        for out_channels in config.channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels, height, width = out_channels, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(
                f"train.channels: {len(config.channels)} pooling blocks shrink a "
                f"{config.image_shape[1]}x{config.image_shape[2]} image to nothing; use fewer"
            )
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(in_channels * height * width, config.hidden_units),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_units, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x / 255.0))


def save_model(model: SmallCNN, config: CNNConfig, model_dir: Path, extra: dict) -> None:
    """Write the weights and a JSON description (architecture, class names, ...)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, model_dir / WEIGHTS_FILE)
    (model_dir / CONFIG_FILE).write_text(
        json.dumps({"architecture": "SmallCNN", "config": asdict(config), **extra}, indent=2) + "\n"
    )


def load_model(model_dir: Path) -> tuple[SmallCNN, dict]:
    """Rebuild the network from ``model.json`` and load ``model.pt`` (weights only)."""
    model_dir = Path(model_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: run the train stage first")
    described = json.loads((model_dir / CONFIG_FILE).read_text())
    raw = described["config"]
    config = CNNConfig(
        image_shape=tuple(raw["image_shape"]),
        num_classes=raw["num_classes"],
        channels=tuple(raw["channels"]),
        hidden_units=raw["hidden_units"],
        dropout=raw["dropout"],
    )
    model = SmallCNN(config)
    model.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, weights_only=True))
    model.eval()
    return model, described


@torch.no_grad()
def predict_logits(model: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    """Logits for uint8/float images (N, C, H, W), in batches, on CPU."""
    model.eval()
    x = torch.as_tensor(x)
    out = [model(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)

"""The server a user would write by hand: FastAPI + uvicorn + ONNX Runtime, no batching.

    python -m bench.baseline_server MODEL_DIR --port 8000

One uvicorn worker, one ONNX Runtime thread (as the bento), the same answer as the bento's
``/predict`` (label, probabilities), and only the obvious checks. It is the yardstick in
``bench/serve.py``: what BentoML's extras (adaptive batching, strict validation, metrics)
cost or gain against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class Image(BaseModel):
    image: list


def make_app(model_dir: Path) -> FastAPI:
    card = json.loads((model_dir / "model.json").read_text())
    names = [str(n) for n in card["class_names"]]
    shape = tuple(card["input_shape"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    app = FastAPI()

    @app.post("/predict")
    def predict(body: Image) -> dict:
        try:
            x = np.asarray(body.image, dtype=np.float32).reshape(1, *shape)
        except (ValueError, TypeError) as exc:
            raise HTTPException(400, f"image: {exc}") from None
        logits = session.run(None, {name: x})[0][0].astype(np.float64)
        e = np.exp(logits - logits.max())
        p = e / e.sum()
        i = int(p.argmax())
        probabilities = dict(zip(names, p.tolist(), strict=True))
        return {"label": names[i], "class_index": i, "probabilities": probabilities}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder with model.onnx and model.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(make_app(args.model_dir), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

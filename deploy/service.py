"""The cloud services: one bento class per data kind, all one :class:`ModelService`.

- :data:`ImageClassifier`: images as JSON (``/predict``, ``/predict_batch``), a .npy batch
  (``/predict_array``) or a PNG/JPEG file (``/predict_image``);
- :data:`TablePredictor`: table rows (``/predict_row``, ``/predict_rows``);
- :data:`SequencePredictor`: windows of a time series or whole sequences (``/forecast``,
  ``/predict_sequences``).

Classification answers ``{label, class_index, probabilities, ...}``, regression ``{value,
target, ...}``; every bad request ``4xx {"error": "<field>: <rule>"}``, never a 5xx. The
package stage builds the bento around the class its model's kind needs, with the model next
to this file (``model/model.onnx`` and ``model/model.json``): no model store, no floating
``:latest`` tag. For development point ``MODEL_DIR`` at a folder holding those two files and
run ``bentoml serve deploy.service:ImageClassifier --host 127.0.0.1`` (another kind's model
is refused; without ``--host`` BentoML binds every interface).
"""

from __future__ import annotations

import bentoml

from deploy.base import (
    IMAGE,
    SEQUENCE,
    TABLE,
    DocumentedService,
    ModelService,
    service_class,
    with_guard,
)
from deploy.common import DataKind


def _cloud(kind: DataKind, name: str) -> bentoml.Service:
    return with_guard(
        bentoml.service(service_class=DocumentedService, **ModelService.options)(
            service_class(ModelService, kind, name, __name__)
        )
    )


ImageClassifier = _cloud(IMAGE, "ImageClassifier")
TablePredictor = _cloud(TABLE, "TablePredictor")
SequencePredictor = _cloud(SEQUENCE, "SequencePredictor")

"""Serving images: raw pixel values 0-255 (the model scales them itself).

Routes: ``/predict`` (one image as nested JSON lists), ``/predict_batch`` (a list of them),
``/predict_array`` (a .npy batch, multipart) and ``/predict_image`` (a PNG/JPEG file,
multipart); the edge serves the two JSON ones. Numpy only: Pillow is imported when a file is
decoded, so the edge bento does without it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import Field

from deploy.common import (
    BYTES_PER_NUMBER,
    DataKind,
    JSONByteArray,
    ModelCard,
    Route,
    ServiceInfo,
)

PIXEL_MIN, PIXEL_MAX = 0.0, 255.0
IMAGE_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_IMAGE_BYTES = 1 << 20
MULTIPART_SLACK = 4096  # multipart adds a few hundred bytes of headers around the file


def to_chw(image: Any, image_shape: tuple[int, int, int], field: str = "image") -> np.ndarray:
    """Turn one image given as nested lists into a float32 (C, H, W) array, or raise.

    Accepted layouts: (H, W) when C is 1, (C, H, W), and (H, W, C). When C == H == W the
    layouts cannot be told apart and (C, H, W) wins. Raises ``InvalidArgument`` whose message
    names ``field`` and the rule that failed. A :class:`JSONByteArray` (the lists, read
    straight into numpy) is checked the same way.
    """
    if type(image) is JSONByteArray:
        out = batch_layout(image.array[None], image_shape)
        if out is not None:
            return check_pixels(out[0], field)
        image = image.tolist()  # a shape the model does not take: say so as for the lists
    if not isinstance(image, list):
        raise InvalidArgument(f"{field}: must be a nested list of pixel values")
    if len(image) == 0:
        raise InvalidArgument(f"{field}: must not be empty")
    try:
        arr = np.asarray(image)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(
            f"{field}: must be a rectangular nested list of numbers (rows of unequal length?)"
        ) from None
    check_numbers(arr, field)
    return check_pixels(to_layout(arr, image_shape, field), field)


def check_numbers(arr: np.ndarray, field: str) -> None:
    if arr.dtype.kind not in "iuf":
        found = {"b": "booleans", "U": "text", "S": "text"}.get(
            arr.dtype.kind, "null, objects or integers too large"
        )
        raise InvalidArgument(f"{field}: every pixel must be a number; found {found}")
    if arr.size == 0:
        raise InvalidArgument(f"{field}: must not be empty")


def check_pixels(arr: np.ndarray, field: str) -> np.ndarray:
    """Finite values in [0, 255] -> the same values as float32; else ``InvalidArgument``."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidArgument(f"{field}: NaN or infinite pixel values are not allowed")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < PIXEL_MIN or hi > PIXEL_MAX:
        raise InvalidArgument(
            f"{field}: pixel values must lie in [0, 255] (raw pixels, not scaled); "
            f"found min {lo:g}, max {hi:g}"
        )
    return arr.astype(np.float32)


def _accepted(image_shape: tuple[int, int, int], batch: str = "") -> str:
    c, h, w = image_shape
    n = f"{batch}, " if batch else ""
    accepted = [f"({n}C, H, W) = ({n}{c}, {h}, {w})", f"({n}H, W, C) = ({n}{h}, {w}, {c})"]
    if c == 1:
        accepted.insert(0, f"({n}H, W) = ({n}{h}, {w})")
    return " or ".join(accepted)


def to_layout(arr: np.ndarray, image_shape: tuple[int, int, int], field: str) -> np.ndarray:
    """(H, W), (C, H, W) or (H, W, C) -> (C, H, W); anything else is refused."""
    out = batch_layout(arr[None], image_shape)
    if out is None:
        raise InvalidArgument(
            f"{field}: shape {tuple(arr.shape)} is not accepted; expected {_accepted(image_shape)}"
        )
    return out[0]


def batch_layout(arr: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray | None:
    """(N, H, W), (N, C, H, W) or (N, H, W, C) -> (N, C, H, W); None for any other shape."""
    c, h, w = image_shape
    if arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        return arr[:, None]
    if arr.ndim == 4 and arr.shape[1:] == (c, h, w):
        return arr
    if arr.ndim == 4 and arr.shape[1:] == (h, w, c):
        return arr.transpose(0, 3, 1, 2)
    return None


def to_batch(images: Any, image_shape: tuple[int, int, int], max_batch_size: int) -> np.ndarray:
    """Check a list of images (each as for :func:`to_chw`) into a float32 (N, C, H, W) array.

    A well-formed batch is checked as one array; when that fails, image by image, so that
    the message names the first bad one (``images[3]: ...``).
    """
    if type(images) is JSONByteArray:
        whole = batch_layout(images.array, image_shape)
        if whole is not None and len(whole) <= max_batch_size:
            return check_pixels(whole, "images")
        images = images.tolist()  # refused: in the words used for the lists
    if not isinstance(images, list):
        raise InvalidArgument("images: must be a list of images")
    if len(images) == 0:
        raise InvalidArgument("images: must hold at least 1 image")
    if len(images) > max_batch_size:
        raise InvalidArgument(
            f"images: at most {max_batch_size} images per request, got {len(images)}"
        )
    try:
        whole = batch_layout(np.asarray(images), image_shape)
        if whole is not None and whole.dtype.kind in "iuf":
            return check_pixels(whole, "images")
    except (ValueError, TypeError, OverflowError, InvalidArgument):
        pass  # ragged, mixed or bad somewhere: find out where, below
    return np.stack([to_chw(img, image_shape, f"images[{i}]") for i, img in enumerate(images)])


def to_array_batch(
    arr: np.ndarray, image_shape: tuple[int, int, int], max_batch_size: int, field: str
) -> np.ndarray:
    """Check an (N, ...) numeric array of images into float32 (N, C, H, W), or raise."""
    check_numbers(arr, field)
    batch = batch_layout(arr, image_shape)
    if batch is None:
        raise InvalidArgument(
            f"{field}: shape {tuple(arr.shape)} is not accepted; expected "
            + _accepted(image_shape, "N")
        )
    if not 1 <= len(batch) <= max_batch_size:
        raise InvalidArgument(
            f"{field}: between 1 and {max_batch_size} images per request, got {len(batch)}"
        )
    return check_pixels(batch, field)


def decode_array(
    data: bytes, image_shape: tuple[int, int, int], max_batch_size: int, field: str
) -> np.ndarray:
    """A .npy file of N images -> checked float32 (N, C, H, W); pickled objects refused.

    The header is read first: a file must hold the bytes its header declares, so a small
    upload cannot make numpy allocate a huge array.
    """
    from numpy.lib import format as npy

    bad = InvalidArgument(f"{field}: must be a .npy file written by numpy.save (no pickles)")
    buffer = io.BytesIO(data)
    try:
        version = npy.read_magic(buffer)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
    except Exception:  # ValueError on a bad magic or header, EOFError, ...
        raise bad from None
    if dtype.hasobject:
        raise bad
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > len(data):
        raise InvalidArgument(f"{field}: the file holds fewer bytes than its header declares")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:
        raise bad from None
    return to_array_batch(arr, image_shape, max_batch_size, field)


def decode_image(data: bytes, image_shape: tuple[int, int, int], field: str) -> np.ndarray:
    """A PNG/JPEG file -> float32 (C, H, W) raw pixels; refuses other formats and sizes."""
    from PIL import Image

    c, h, w = image_shape
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidArgument(
            f"{field}: the file declares an image far larger than {w}x{h} pixels"
        ) from None
    except Exception:  # UnidentifiedImageError, and Pillow raises many kinds on bad files
        raise InvalidArgument(f"{field}: must be a PNG or JPEG image file") from None
    # Checked before decoding the pixels: a tiny file may declare a huge image.
    if img.size != (w, h):
        raise InvalidArgument(
            f"{field}: image is {img.size[0]}x{img.size[1]} pixels; the model takes "
            f"{w}x{h} (width x height)"
        )
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
        raise InvalidArgument(f"{field}: image mode {img.mode} is not supported; send 8-bit")
    try:
        img = img.convert("L" if c == 1 else "RGB")
    except Exception:  # the pixels are decoded here: OSError, SyntaxError, zlib.error, ...
        raise InvalidArgument(f"{field}: the image file is truncated or corrupt") from None
    if c not in (1, 3):
        raise InvalidArgument(f"{field}: image files serve 1- or 3-channel models only")
    arr = np.asarray(img, dtype=np.float32)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def request_limit(image_shape: tuple[int, ...], max_batch_size: int) -> int:
    """Body size (bytes) that a full batch of the longest-written pixels fits in."""
    return max_batch_size * int(np.prod(image_shape)) * BYTES_PER_NUMBER + 64 * 1024


def max_image_bytes(card: ModelCard) -> int:
    return int(card.raw.get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES)


def _read_shape(card: dict, where: Path) -> tuple[int, ...]:
    shape = card.get("input_shape")
    if shape is None and "image_shape" in card:
        raise ValueError(
            f"{where}: input_shape is missing (image_shape is its old name): package the model "
            "again with this version of the pipeline"
        )
    if not (isinstance(shape, list) and len(shape) == 3 and all(int(d) >= 1 for d in shape)):
        raise ValueError(f"{where}: input_shape must be [C, H, W] for images")
    return tuple(int(d) for d in shape)


class ImageInfo(ServiceInfo):
    image_shape: list[int] = Field(description="(C, H, W) the model expects")
    max_image_bytes: int = Field(description="largest /predict_image upload (the cloud's)")


ImageField = Annotated[
    list[Any],
    Field(
        description="one image of raw pixel values 0-255 as nested lists: (H, W) for one "
        "channel, (C, H, W) or (H, W, C); its size is /info's image_shape",
        examples=[[[0, 255, 0], [255, 255, 255], [0, 255, 0]]],
    ),
]
ImagesField = Annotated[
    list[Any],
    Field(
        description="a list of images, each as for /predict; at most max_batch_size",
        examples=[[[[0, 255], [255, 0]], [[255, 0], [0, 255]]]],
    ),
]
UploadField = Annotated[
    Path,
    Field(description="a PNG or JPEG file of exactly the model's image size (see /info)"),
]
ArrayField = Annotated[
    Path,
    Field(
        description="a .npy file (numpy.save, no pickles) of raw pixel values 0-255 shaped "
        "(N, H, W) for one channel, (N, C, H, W) or (N, H, W, C); N at most max_batch_size"
    ),
]


def example_image(image_shape: tuple[int, int, int], variant: int = 0) -> np.ndarray:
    """A valid image of the model's shape, as uint8 (C, H, W): a bright vertical stroke on
    black (variant 0) or a ring (1), the way a digit is drawn."""
    c, h, w = image_shape
    yy, xx = np.mgrid[0:h, 0:w]
    if variant == 0:
        drawn = (abs(xx - (w - 1) / 2) <= max(w / 14, 0.5)) & (abs(yy - (h - 1) / 2) <= 0.3 * h)
    else:
        r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2))
        drawn = (r > 0.4) & (r < 0.65)
    return np.broadcast_to(np.where(drawn, 255, 0).astype(np.uint8), (c, h, w))


def _as_sent(image: np.ndarray) -> list:
    """(C, H, W) as a client sends it: (H, W) for one channel, else (C, H, W)."""
    return (image[0] if len(image) == 1 else image).tolist()


def _example_file(card: ModelCard, name: str) -> str:
    c, h, w = card.input_shape
    if name == "array":
        shape = (2, h, w) if c == 1 else (2, c, h, w)
        return (
            f"python -c \"import numpy as np; np.save('batch.npy', "
            f'np.zeros({shape}, np.uint8))" && curl -F array=@batch.npy <this server>'
            "/predict_array"
        )
    mode = "L" if c == 1 else "RGB"
    return (
        f"python -c \"from PIL import Image; Image.new('{mode}', ({w}, {h})).save('image.png')\""
        " && curl -F image=@image.png <this server>/predict_image"
    )


def _one(image: Any, card: ModelCard) -> np.ndarray:
    return to_chw(image, card.input_shape, "image")[None]


def _many(images: Any, card: ModelCard) -> np.ndarray:
    return to_batch(images, card.input_shape, card.max_batch_size)


def _npy_file(path: Path, card: ModelCard) -> np.ndarray:
    return decode_array(Path(path).read_bytes(), card.input_shape, card.max_batch_size, "array")


def _image_file(path: Path, card: ModelCard) -> np.ndarray:
    return decode_image(Path(path).read_bytes(), card.input_shape, "image")[None]


IMAGE = DataKind(
    name="image",
    routes=(
        Route("predict", "image", ImageField, _one, many=False, byte_arrays=True,
              doc="Classify one image sent as nested lists of raw pixel values.",
              example=lambda card: _as_sent(example_image(card.input_shape))),
        Route("predict_batch", "images", ImagesField, _many, many=True, byte_arrays=True,
              doc="Up to ``max_batch_size`` images in one call; answers in the same order.",
              example=lambda card: [_as_sent(example_image(card.input_shape, v)) for v in (0, 1)]),
        Route("predict_array", "array", ArrayField, _npy_file, many=True,
              doc="A batch sent as one .npy file (multipart/form-data, field ``array``).\n\n"
              "The compact way to send many images: no JSON to parse, answers in order.",
              # A .npy batch is far smaller than the same batch as JSON: that limit bounds it.
              upload_limit=lambda card, json_limit: json_limit + MULTIPART_SLACK,
              example=lambda card: _example_file(card, "array")),
        Route("predict_image", "image", UploadField, _image_file, many=False,
              doc="One uploaded PNG or JPEG file (multipart/form-data, field ``image``).",
              upload_limit=lambda card, json_limit: max_image_bytes(card) + MULTIPART_SLACK,
              example=lambda card: _example_file(card, "image")),
    ),
    read_shape=_read_shape,
    request_limit=lambda card: request_limit(card.input_shape, card.max_batch_size),
    info=ImageInfo,
    info_fields=lambda card: {
        "image_shape": list(card.input_shape),
        "max_image_bytes": max_image_bytes(card),
    },
)  # fmt: skip

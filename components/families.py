"""The model families, each declared once: what data it reads and how it is compressed.

A family is a network architecture (components/model.py builds it). Everything else that
differs between families is read from its declaration here, not branched on by name: the data
kinds it can read (by the rank of one example: an image is (C, H, W), a sequence (T, F), a
table row (F,)), the widths that set its size (and that distillation shrinks), whether its
recurrent units are pruned by our own code, and the op types it hands the int8 quantizer.

This module imports nothing heavy: params validation and ingest read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE, SEQUENCE, ROW = 3, 2, 1  # the rank of one example of each shape


@dataclass(frozen=True)
class Family:
    name: str
    net: str  # the nn.Module class in components/model.py
    reads: tuple[int, ...]  # ranks of the examples it can read
    built_for: int  # the rank it is made for: ``train.model: auto`` picks it for such data
    needs: str  # how a message names what it reads: "cnn needs images"
    widths: tuple[str, ...]  # NetConfig fields that set its size (distillation scales them)
    recurrent: bool = False  # LSTM / GRU units: pruned and shrunk by our own code
    # Convolutions see an image's pixels in place: shifted or turned a little it is the same
    # image to them, so the recipe augments images by default (components/recipe.py). A dense
    # or recurrent net reads each pixel by position and has to learn every shift anew.
    convolutional: bool = False
    # train.* keys beyond its widths that shape its network: with the widths, the train keys
    # only some families read (an override of one the chosen model ignores is refused).
    also_reads: tuple[str, ...] = ()
    # The op types its ONNX graph hands the quantizer (dense layers arrive as MatMul: the
    # pre-processing splits Gemm into MatMul + Add), as far as dynamic int8 is concerned.
    quantized_ops: frozenset[str] = frozenset({"MatMul"})

    def describe(self, config) -> str:
        """The widths that set one network's size, for messages."""
        parts = []
        if self.recurrent:
            parts.append(f"{config.rnn_layers} x {self.name} of {config.rnn_hidden_size} units")
        parts += [
            f"{field.replace('_', ' ')} {list(getattr(config, field))}"
            for field in self.widths
            if field != "rnn_hidden_size"
        ]
        return ", ".join(parts)

    @property
    def train_keys(self) -> tuple[str, ...]:
        """The train.* keys that shape this family's network."""
        return self.widths + self.also_reads


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "cnn",
            net="SmallCNN",
            reads=(IMAGE,),
            built_for=IMAGE,
            needs="images",
            widths=("channels", "hidden_units"),
            convolutional=True,
            quantized_ops=frozenset({"Conv", "MatMul"}),
        ),
        Family(
            "mlp",
            net="MLP",
            reads=(IMAGE, SEQUENCE, ROW),  # on the flattened example
            built_for=ROW,
            needs="examples of any shape",
            widths=("hidden_units",),
        ),
        Family(
            "lstm",
            net="RecurrentNet",
            reads=(SEQUENCE, IMAGE),  # an image row by row
            built_for=SEQUENCE,
            needs="sequences",
            widths=("rnn_hidden_size", "hidden_units"),
            recurrent=True,
            also_reads=("rnn_layers",),
            quantized_ops=frozenset({"LSTM", "MatMul"}),
        ),
        Family(
            "gru",
            net="RecurrentNet",
            reads=(SEQUENCE, IMAGE),
            built_for=SEQUENCE,
            needs="sequences",
            widths=("rnn_hidden_size", "hidden_units"),
            recurrent=True,
            also_reads=("rnn_layers",),
            quantized_ops=frozenset({"GRU", "MatMul"}),
        ),
    )
}
MODELS = tuple(FAMILIES)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"train.model: unknown model {name!r}; use one of {list(FAMILIES)}")
    return FAMILIES[name]


def readers_of(train_key: str) -> tuple[str, ...]:
    """The families whose network ``train.<train_key>`` shapes; () for a key all of them read
    alike (learning rate, epochs, dropout, ...) or none declares."""
    readers = tuple(name for name, f in FAMILIES.items() if train_key in f.train_keys)
    return () if len(readers) == len(FAMILIES) else readers


# ``train.model: auto`` for sequences: the GRU, which forecast both bench series better than the
# LSTM after the same steps (bench/defaults.py) and is a third cheaper per unit.
PREFERRED = {SEQUENCE: "gru"}


def preferred(rank: int) -> str:
    """``train.model: auto`` for examples of this rank: the family built for them (the GRU for
    sequences, :data:`PREFERRED`), else the first that reads them."""
    if rank in PREFERRED:
        return PREFERRED[rank]
    built = [name for name, f in FAMILIES.items() if f.built_for == rank]
    readers = built or list(reading(rank))
    if not readers:
        raise ValueError(f"no model family reads examples of rank {rank}")
    return readers[0]


def reading(rank: int) -> tuple[str, ...]:
    """The families that can read examples of this rank, in declaration order."""
    return tuple(name for name, f in FAMILIES.items() if rank in f.reads)

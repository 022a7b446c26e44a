"""One preprocessing for training files, ``medcl predict`` and the MONAI bundle.

:class:`Preprocessing` holds what a run records about its inputs (spatial size, channels,
intensity mode, normalisation) and writes it as a list of MONAI ``ConfigParser`` items
(:meth:`Preprocessing.config`). The bundle's ``configs/inference.json`` stores that list as is;
training and ``medcl predict`` instantiate the very same list (:meth:`Preprocessing.compose`),
so the three paths cannot drift apart. Every step is a stock MONAI transform except
:class:`ToChannelsd` (grey <-> RGB) and :func:`pil_mode` (PIL mode normalisation), which the
config references by ``_target_``.

Reader orientation: MONAI's default readers transpose 2D images to (W, H); medcl keeps the
array order of PIL and pydicom, ``(H, W)`` (``PILReader(reverse_indexing=False)``,
``PydicomReader(swap_ij=False)``), so a 20x30 PNG is ``(C, 20, 30)`` everywhere.
"""

from __future__ import annotations

__all__ = [
    "INTENSITY_MODES",
    "Preprocessing",
    "SuffixReader",
    "ToChannelsd",
    "pil_mode",
    "to_channels",
]

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from monai.data import ImageReader
from monai.transforms import Compose, MapTransform
from torch import Tensor

from medcl.errors import ConfigError

#: How images reach [0, 1]: per-image min-max (file sources) or the fixed 0..255 range (8-bit
#: arrays such as MedMNIST).
INTENSITY_MODES = ("minmax", "uint8")
_GRAY_MODES = ("L", "I", "F")


def pil_mode(img):
    """PIL image -> mode ``L``/``I``/``F`` (one channel) or ``RGB`` (three): PILReader converter."""
    if img.mode in (*_GRAY_MODES, "RGB"):
        return img
    if img.mode.startswith("I;16"):
        return img.convert("I")
    return img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")


def to_channels(x: Tensor, *, channels: int | None) -> Tensor:
    """``(C, *spatial)`` -> ``(channels, *spatial)``: mean for 3->1, repeat for 1->3."""
    if channels is None or x.shape[0] == channels:
        return x
    return x.mean(0, keepdim=True) if channels == 1 else x[:1].repeat(3, *([1] * (x.ndim - 1)))


class SuffixReader(ImageReader):
    """Pick one of ``readers`` by file suffix (the first whose ``verify_suffix`` accepts it).

    MONAI's ``LoadImage`` tries user-given readers one after another until one does not raise;
    this reader makes the choice explicit, so a file is never decoded by the wrong library.

    Args:
        readers: configured MONAI readers, e.g. ``PILReader(reverse_indexing=False)``.
    """

    def __init__(self, readers: Sequence[ImageReader]) -> None:
        super().__init__()
        self.readers = list(readers)

    def _pick(self, filename: Any) -> ImageReader | None:
        name = filename[0] if isinstance(filename, list | tuple) and filename else filename
        return next((r for r in self.readers if r.verify_suffix(name)), None)

    def verify_suffix(self, filename: Any) -> bool:
        return self._pick(filename) is not None

    def read(self, data: Any, **kwargs: Any) -> tuple[ImageReader, Any]:
        reader = self._pick(data)
        if reader is None:
            raise ValueError(f"no reader for {data}; supported: PNG/JPEG, DICOM, NIfTI.")
        return reader, reader.read(data, **kwargs)

    def get_data(self, img: tuple[ImageReader, Any]) -> tuple[Any, dict]:
        reader, obj = img
        return reader.get_data(obj)


class ToChannelsd(MapTransform):
    """Dictionary transform: convert ``(C, *spatial)`` images to ``channels`` channels.

    Args:
        keys: keys of the images to convert.
        channels: 1 (mean of RGB) or 3 (grey repeated); ``None`` keeps each image's own.
        allow_missing_keys: as in MONAI's ``MapTransform``.
    """

    def __init__(
        self, keys: Any, channels: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (None, 1, 3):
            raise ConfigError(f"ToChannelsd: channels must be 1, 3 or None; got {channels!r}.")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_channels(d[key], channels=self.channels)
        return d


@dataclass(frozen=True)
class Preprocessing:
    """What turns a file into the network's ``[0, 1]`` input, as recorded in a run.

    Args:
        image_size: target spatial size ``(H, W[, D])``; ``None`` keeps the native size.
        channels: 1 or 3 output channels; ``None`` keeps each file's own.
        intensity: ``"minmax"`` (per-image rescale to [0, 1]) or ``"uint8"`` (0..255 -> [0, 1]).
        mean: per-channel (or one) normalisation mean applied inside the exported model.
        std: per-channel (or one) normalisation standard deviation, inside the model too.
        key: dictionary key of the image.

    Shapes: a file -> float32 ``(channels, *image_size)`` in [0, 1].
    """

    image_size: tuple[int, ...] | None = None
    channels: int | None = None
    intensity: Literal["minmax", "uint8"] = "minmax"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    key: str = "image"

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"intensity must be one of {list(INTENSITY_MODES)}; got {self.intensity!r}."
            )
        if self.image_size is not None and (
            len(self.image_size) not in (2, 3) or min(self.image_size) < 1
        ):
            raise ConfigError(
                f"image_size must be 2 or 3 positive ints (H, W[, D]); got {self.image_size!r}."
            )
        if not self.std or min(self.std) <= 0:
            raise ConfigError(f"std must be positive; got {self.std!r}.")

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Preprocessing:
        """From an export's metadata (``image_size``, ``channels``, ``intensity``)."""
        intensity = meta.get("intensity", {})
        norm = intensity.get("normalise", {})
        as_tuple = lambda v: tuple(float(x) for x in (v if isinstance(v, list) else [v]))  # noqa: E731
        return cls(
            image_size=tuple(int(s) for s in meta["image_size"]),
            channels=int(meta["channels"]),
            intensity=intensity.get("mode", "minmax"),
            mean=as_tuple(norm.get("mean", 0.5)),
            std=as_tuple(norm.get("std", 0.5)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record of the fields."""
        d = asdict(self)
        d["image_size"] = None if self.image_size is None else list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def config(self) -> list[dict[str, Any]]:
        """The pipeline as MONAI ``ConfigParser`` items (needs ``$import torch`` for the dtype)."""
        k = self.key
        if self.intensity == "minmax":
            scale = {"_target_": "ScaleIntensityd", "keys": k, "minv": 0.0, "maxv": 1.0}
        else:  # the fixed 0-255 range of 8-bit sources (what a MedMNIST-trained model saw)
            scale = {
                "_target_": "ScaleIntensityRanged",
                "keys": k,
                "a_min": 0.0,
                "a_max": 255.0,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        items: list[dict[str, Any]] = [
            {
                "_target_": "LoadImaged",
                "keys": k,
                "image_only": True,
                # the reader is picked by suffix; (H, W) order kept for PNG/JPEG and DICOM
                "reader": {
                    "_target_": "medcl.data.preprocessing.SuffixReader",
                    "readers": [
                        {
                            "_target_": "PILReader",
                            "reverse_indexing": False,
                            "converter": {
                                "_target_": "medcl.data.preprocessing.pil_mode",
                                "_mode_": "callable",
                            },
                        },
                        {"_target_": "PydicomReader", "swap_ij": False},
                        {"_target_": "NibabelReader"},
                    ],
                },
            },
            {"_target_": "EnsureChannelFirstd", "keys": k},
            {
                "_target_": "medcl.data.preprocessing.ToChannelsd",
                "keys": k,
                "channels": self.channels,
            },
            scale,
        ]
        if self.image_size is not None:
            items.append(
                {
                    "_target_": "Resized",
                    "keys": k,
                    "spatial_size": list(self.image_size),
                    "mode": "bilinear" if len(self.image_size) == 2 else "trilinear",
                    "anti_aliasing": True,
                }
            )
        items.append(
            {
                "_target_": "EnsureTyped",
                "keys": k,
                "data_type": "tensor",
                "dtype": "$torch.float32",
                "track_meta": False,
            }
        )
        return items

    def compose(self) -> Compose:
        """Instantiate :meth:`config` with MONAI's ``ConfigParser``: the bundle's own objects."""
        from monai.bundle import ConfigParser

        parser = ConfigParser(
            {
                "imports": ["$import torch"],
                "preprocessing": {"_target_": "Compose", "transforms": self.config()},
            }
        )
        # MONAI 1.6 logs an nvImageCodec notice whenever a DICOM reader is built without it.
        logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return parser.get_parsed_content("preprocessing")
        finally:
            logger.setLevel(level)

"""Images to model inputs: the `--preprocess` spec for a calibration folder of photos or scans.

    size=HxW,letterbox,pad=114,scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=NCHW,rgb

Every key is optional. `size` defaults to the model input's fixed spatial dims (an image keeps
its own size where the model's dims are dynamic); `letterbox` keeps the aspect ratio and pads
(centered, with `pad` in 0-255 pixel units) instead of stretching; `scale` multiplies the 0-255
pixel values before `(x - mean) / std`; lists are `|`-separated, one value or one per channel;
`rgb`, `bgr` or `gray` choose the channels (gray by default for one-channel inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from onnxc.errors import OnnxcError, UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_KEYS = "size, letterbox, pad, scale, mean, std, layout, rgb|bgr|gray"


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] | None = None  # (height, width)
    letterbox: bool = False
    pad: float = 114.0
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    color: str | None = None  # rgb, bgr, gray; None: gray for one channel, else rgb

    def for_input(self, shape: tuple) -> Preprocess:
        """Fill what the spec left open from the model input's (rank-4) shape."""
        if len(shape) != 4:
            raise OnnxcError(f"images need a rank-4 model input (N,C,H,W or N,H,W,C), got rank {len(shape)}")
        nchw = self.layout == "NCHW"
        c, h, w = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
        spec = self
        if spec.size is None and _fixed(h) and _fixed(w):
            spec = replace(spec, size=(int(h), int(w)))
        if spec.color is None:
            spec = replace(spec, color="gray" if c == 1 else "rgb")
        channels = 1 if spec.color == "gray" else 3
        if _fixed(c) and int(c) != channels:
            raise OnnxcError(f"the model input has {c} channels but --preprocess gives {channels} ({spec.color})")
        for key in ("mean", "std"):
            if len(getattr(spec, key)) not in (1, channels):
                raise UsageError(f"--preprocess {key}: give 1 or {channels} values")
        return spec

    def load(self, path: Path, dtype: np.dtype) -> np.ndarray:
        """One image as a batch of one: [1, C, H, W] (NCHW) or [1, H, W, C]."""
        from PIL import Image  # Pillow is only needed for image folders

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.color == "gray" else "RGB")
                if self.size is not None:
                    img = self._resize(img)
                x = np.asarray(img, dtype=np.float32)
        except OSError as exc:
            raise OnnxcError(f"{path}: not a readable image ({exc})") from None
        x = x[:, :, None] if x.ndim == 2 else x
        if self.color == "bgr":
            x = x[:, :, ::-1]
        x = (x * np.float32(self.scale) - np.float32(self.mean)) / np.float32(self.std)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None]).astype(dtype)

    def _resize(self, img):
        from PIL import Image

        h, w = self.size
        if not self.letterbox:
            return img.resize((w, h), Image.BILINEAR)
        ratio = min(h / img.height, w / img.width)
        nh, nw = max(1, round(img.height * ratio)), max(1, round(img.width * ratio))
        fill = int(round(self.pad)) if img.mode == "L" else (int(round(self.pad)),) * 3
        canvas = Image.new(img.mode, (w, h), fill)
        canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
        return canvas


def parse(spec: str | None) -> Preprocess:
    """Parse `--preprocess`; unknown keys and bad values are usage errors naming the valid keys."""
    result = Preprocess()
    if not spec:
        return result
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        try:
            if key in ("rgb", "bgr", "gray", "grey") and not eq:
                result = replace(result, color="gray" if key == "grey" else key)
            elif key == "letterbox" and not eq:
                result = replace(result, letterbox=True)
            elif key == "size":
                h, w = (int(d) for d in value.lower().split("x"))
                if h <= 0 or w <= 0:
                    raise ValueError
                result = replace(result, size=(h, w))
            elif key in ("scale", "pad"):
                result = replace(result, **{key: float(Fraction(value.strip()))})
            elif key in ("mean", "std"):
                values = tuple(float(Fraction(v.strip())) for v in value.split("|"))
                if key == "std" and any(v == 0 for v in values):
                    raise ValueError
                result = replace(result, **{key: values})
            elif key == "layout" and value.upper() in ("NCHW", "NHWC"):
                result = replace(result, layout=value.upper())
            else:
                raise UsageError(f"--preprocess: unknown or malformed item '{item}' (keys: {_KEYS})")
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--preprocess: bad value in '{item}' (example: "
                             "size=320x320,letterbox,scale=1/255,mean=0,std=1,layout=NCHW,rgb)") from None
    return result


def _fixed(d) -> bool:
    return isinstance(d, int) and d > 0

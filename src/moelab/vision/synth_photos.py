"""Real photographs for captioning smoke tests: the pictures bundled in scikit-image's wheel
(``skimage.data``; nothing is downloaded), each with one fixed caption written for moelab.

Stage-1 format (docs/methods.md §12 "Stage 1 uses ``<image>\\n{caption}``"): the user turn is only
``"<image>\\n"`` and the caption is the assistant's answer, so the loss falls on the caption alone.
Grey pictures become RGB; every picture is shrunk (Lanczos) to fit ``photo_max_side``, never enlarged.
"""

from __future__ import annotations

from moelab.errors import DataError

#: name in skimage.data -> caption. Only pictures that ship inside the scikit-image wheel.
PHOTOS = {
    "astronaut": "A smiling astronaut in an orange spacesuit, with a flag and a model space shuttle behind her.",
    "coffee": "A cup of coffee on a red saucer with a spoon, on a wooden table.",
    "chelsea": "A close-up of a tabby cat with green eyes.",
    "rocket": "A rocket on its launch pad at dusk, between tall towers.",
    "camera": "A black-and-white photo of a man filming with a camera on a tripod in a field.",
    "hubble_deep_field": "Many small galaxies scattered across a black sky.",
    "immunohistochemistry": "A microscope image of tissue stained brown and blue.",
    "moon": "A grey close-up of a cratered surface.",
    "page": "A scanned page of printed text about region-based segmentation.",
    "text": "Handwritten symbols on paper, seen at an angle.",
    "clock": "A blurred wall clock on a grey background.",
    "coins": "Rows of old coins on a dark background.",
    "colorwheel": "A colour wheel on a black background.",
    "retina": "A photograph of the back of an eye, with its blood vessels.",
    "brick": "A grey brick wall seen at an angle.",
}


def available_photos() -> list[str]:
    """The names of :data:`PHOTOS` this scikit-image can load offline (in :data:`PHOTOS` order)."""
    data = _skimage_data()
    out = []
    for name in PHOTOS:
        try:
            getattr(data, name)()
        except Exception:   # noqa: BLE001 (a picture that needs a download or is missing in this version)
            continue
        out.append(name)
    return out


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise DataError("the photographs come from scikit-image; pip install 'moelab[vision]' (or scikit-image), "
                        "or leave --photos out") from None
    return skimage.data


def load_photo(name: str, max_side: int):
    """The picture ``name`` as an RGB PIL image that fits ``max_side`` (aspect kept)."""
    import numpy as np
    from PIL import Image

    if name not in PHOTOS:
        raise DataError(f"no photograph {name!r}; there are {', '.join(PHOTOS)}")
    a = np.asarray(getattr(_skimage_data(), name)())
    img = Image.fromarray(a).convert("RGB")
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)
    return img


def make_photo(name: str, max_side: int):
    """A captioning example: the picture, and fields ``name``, ``caption``, ``source``."""
    return load_photo(name, max_side), {"prompt": "", "answer": PHOTOS[name], "name": name, "caption": PHOTOS[name],
                                        "source": f"skimage.data.{name}"}


__all__ = ["PHOTOS", "available_photos", "load_photo", "make_photo"]

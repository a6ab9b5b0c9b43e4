"""Every PIL image mode comes out as the right RGB in [-1, 1]: one case per mode with its exact value, through the
loader a training folder uses (open, `to_rgb`, resize, crop, tensor)."""

import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from latentdiffusion.data import load_image_captions
from latentdiffusion.images import BACKGROUND, to_rgb
from latentdiffusion.data.transforms import load_rgb, to_tensor
from latentdiffusion.errors import DataError


def _value(c):
    """The [-1, 1] value of 8-bit levels c."""
    return torch.tensor(c, dtype=torch.float32).div(127.5).sub(1.0)


def _pixels(image):
    """The loaded tensor (3,) of a solid image's first pixel."""
    return to_tensor(load_rgb(image))[:, 0, 0]


def _over_white(v, a):
    return [round((c * a + 255 * (255 - a)) / 255) for c in v]


def _png16(path, samples, color_type, trns=None):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): samples (H, W, C) in [0, 65535]."""
    samples = np.asarray(samples)
    h, w = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    path.write_bytes(data + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _solid(mode, value, size=(4, 4)):
    return Image.new(mode, size, value)


def _from_array(array, mode):
    return Image.frombytes(mode, array.shape[::-1], array.tobytes())


def _pal(transparent):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


MODES = {  # name -> (image factory, expected 8-bit RGB of its pixels)
    "1": (lambda: _solid("1", 1), [255, 255, 255]),
    "L": (lambda: _solid("L", 77), [77, 77, 77]),
    "LA": (lambda: _solid("LA", (40, 100)), _over_white([40] * 3, 100)),
    "P": (lambda: _pal(False), [200, 100, 50]),
    "P transparent": (lambda: _pal(True), [255, 255, 255]),
    "PA": (lambda: _pal(False).convert("PA"), [200, 100, 50]),
    # 16-bit grey, 32768 of 65535: round(32768 / 257) = 128, about 0.0 (the reported bug gave +1.0)
    "I;16": (lambda: _from_array(np.full((4, 4), 32768, "<u2"), "I;16"), [128] * 3),
    "I;16L": (lambda: _from_array(np.full((4, 4), 1000, "<u2"), "I;16L"), [4] * 3),
    "I;16B": (lambda: _from_array(np.full((4, 4), 65535, ">u2"), "I;16B"), [255] * 3),
    "I": (lambda: Image.fromarray(np.full((4, 4), 20000, np.int32)), [78] * 3),  # 20000 / 257 = 77.8
    "I negative": (lambda: Image.fromarray(np.full((4, 4), -5, np.int32)), [0] * 3),
    "F": (lambda: Image.fromarray(np.full((4, 4), 0.25, np.float32)), [64] * 3),  # 63.75
    "F above 1": (lambda: Image.fromarray(np.full((4, 4), 3.0, np.float32)), [255] * 3),
    "RGB": (lambda: _solid("RGB", (10, 20, 30)), [10, 20, 30]),
    "RGBA": (lambda: _solid("RGBA", (200, 0, 50, 64)), _over_white([200, 0, 50], 64)),
    "RGBA opaque": (lambda: _solid("RGBA", (200, 0, 50, 255)), [200, 0, 50]),
    "RGBA clear": (lambda: _solid("RGBA", (200, 0, 50, 0)), list(BACKGROUND)),
    "CMYK": (lambda: _solid("CMYK", (10, 20, 30, 40)), [round((255 - c) * (255 - 40) / 255) for c in (10, 20, 30)]),
    "HSV": (lambda: _solid("HSV", (0, 255, 255)), [255, 0, 0]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_loads_as_its_rgb(mode):
    factory, expected = MODES[mode]
    torch.testing.assert_close(_pixels(factory()), _value(expected), rtol=0, atol=0)


def test_ycbcr_is_jfif():
    """YCbCr -> RGB by JFIF (R = Y + 1.402 (Cr - 128), ...); PIL's fixed point may land one level below."""
    y, cb, cr = 100, 90, 200
    jfif = [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)]
    got = _pixels(_solid("YCbCr", (y, cb, cr)))
    assert ((got - _value(jfif)).abs() <= 1 / 127.5 + 1e-6).all(), got


def test_lab_through_colour_management():
    """L* = 50 with a* = b* = 0 is a neutral mid grey in sRGB (about 119)."""
    lab = ImageCms.profileToProfile(_solid("RGB", (119, 119, 119)), ImageCms.createProfile("sRGB"),
                                    ImageCms.createProfile("LAB"), outputMode="LAB")
    got = _pixels(lab)
    assert (got - _value([119] * 3)).abs().max() <= 1 / 127.5 + 1e-6


@pytest.mark.parametrize("case", ["grey", "rgb", "rgba", "grey transparent"])
def test_16_bit_png_files(tmp_path, case):
    """16-bit PNGs as files: grey (opened as I;16), RGB and RGBA (Pillow keeps the high byte), grey with a tRNS key."""
    path = tmp_path / "x.png"
    if case == "grey":
        _png16(path, np.full((4, 4, 1), 32768), 0)
        expected = [128] * 3
    elif case == "rgb":
        _png16(path, np.tile([0x80FF, 65535, 0], (4, 4, 1)), 2)
        expected = [128, 255, 0]
    elif case == "rgba":
        _png16(path, np.tile([0, 65535, 0, 32768], (4, 4, 1)), 6)
        expected = _over_white([0, 255, 0], 128)
    else:  # every pixel is the transparent grey 100
        _png16(path, np.full((4, 4, 1), 100), 0, trns=struct.pack(">H", 100))
        expected = list(BACKGROUND)
    torch.testing.assert_close(_pixels(Image.open(path)), _value(expected), rtol=0, atol=0)


def test_unsupported_mode_names_it():
    """A mode without a rule (PIL's image-less stand-in here: no current Pillow opens files in other modes)."""
    with pytest.raises(DataError, match="'BGR;24'"):
        to_rgb(SimpleNamespace(mode="BGR;24", info={}))


def test_16_bit_grey_in_a_training_folder(tmp_path):
    """The reported case: a captioned folder holding a 16-bit grey PNG of 32768 trains as about 0.0, not +1.0."""
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "grey.png")
    (tmp_path / "grey.txt").write_text("a grey square")
    item = load_image_captions(str(tmp_path), 8)[0]
    torch.testing.assert_close(item["pixel_values"], _value([128] * 3)[:, None, None].expand(3, 8, 8))


def test_pipeline_and_control_images_take_the_same_conversion():
    """img2img / inpainting / ControlNet inputs go through to_rgb too: 16-bit grey 32768 is 128/255, not white."""
    from latentdiffusion.images import image_tensor
    from latentdiffusion.pipeline import control_tensor

    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert grey16.mode == "I;16"
    assert torch.allclose(image_tensor(grey16), torch.full((1, 3, 8, 8), 128 / 255))
    assert torch.allclose(control_tensor(grey16, 2, (8, 8)), torch.full((1, 3, 8, 8), 128 / 255))

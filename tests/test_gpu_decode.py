"""GPU JPEG decoding follows the CPU path's rules: EXIF orientation, resize, crop, normalisation, fallbacks.

The decode itself runs on the GPU only with CUDA (tests/test_gpu.py); here the same code runs with
torchvision's CPU JPEG decoder, so orientation and transform rules are checked on every machine.
"""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from selflabel.backbones import create_backbone
from selflabel.data import (EncodedImages, ImageDataset, ImageRecord, decode_encoded_batch, gpu_jpeg_header, orient,
                            scan_folder)
from selflabel.sample import sample_dir

CPU = torch.device("cpu")


def _with_orientation(src, dst, orientation: int):
    with Image.open(src) as im:
        exif = im.getexif()
        exif[0x0112] = orientation
        im.crop((0, 0, im.width, im.height * 3 // 4)).save(dst, format="JPEG", quality=95, exif=exif)  # not square
    return dst


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_equals_pil_exif_transpose(tmp_path, orientation):
    src = scan_folder(sample_dir()).records[0].path
    p = _with_orientation(src, tmp_path / "o.jpg", orientation)
    with Image.open(p) as im:
        raw = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        ref = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    assert gpu_jpeg_header(p, 10**8) == orientation
    assert torch.equal(orient(raw, orientation), ref)


def _batch(ds, idx):
    return [ds[i] for i in idx]


def test_encoded_batch_equals_cpu_decode(tmp_path):
    """JPEGs (rotated by EXIF too) through decode_encoded_batch equal the CPU path within tolerance;
    PNG, CMYK and broken files take the CPU path or are reported, in the right rows."""
    bb = create_backbone("tiny")
    photos = [r.path for r in scan_folder(sample_dir()).records[::20][:4]]
    files = [photos[0], _with_orientation(photos[1], tmp_path / "rot6.jpg", 6), photos[2]]
    with Image.open(photos[3]) as im:
        im.convert("CMYK").save(tmp_path / "cmyk.jpg", format="JPEG")
        im.save(tmp_path / "plain.png")
    (tmp_path / "broken.jpg").write_bytes(open(photos[0], "rb").read()[:300])
    files += [tmp_path / "cmyk.jpg", tmp_path / "plain.png", tmp_path / "broken.jpg"]
    recs = [ImageRecord(str(i), p) for i, p in enumerate(files)]
    size = 96
    tf = bb.make_transform(size)
    enc = EncodedImages(recs, tf, draft_size=None)
    kinds = [enc[i][0] for i in range(len(recs))]
    assert kinds == ["jpeg", "jpeg", "jpeg", "tensor", "tensor", "error"]
    x, idx, bad = decode_encoded_batch(_batch(enc, range(len(recs))), CPU, enc.cpu.__getitem__, size,
                                       bb.decode_size(size), bb.mean, bb.std)
    assert idx.tolist() == [0, 1, 2, 3, 4] and [i for i, _ in bad] == [5]
    cpu = ImageDataset(recs, tf)  # the CPU path without draft scaling: the GPU decodes at full size too
    ref = torch.stack([cpu[i][0] for i in range(5)])
    assert x.shape == ref.shape
    err = (x - ref).abs()
    assert err.mean() < 0.02 and err.max() < 0.5  # resize of floats vs PIL's uint8 resize: rounding only
    assert torch.equal(x[3:], ref[3:])  # CPU fallbacks are the CPU path itself


def test_bad_jpeg_in_batch_falls_back_per_file(tmp_path, monkeypatch):
    """When the decoder refuses a file the batch call fails: the others still decode, that one goes to the CPU."""
    import selflabel.data as data

    bb = create_backbone("tiny")
    recs = [ImageRecord(str(i), r.path) for i, r in enumerate(scan_folder(sample_dir()).records[:3])]
    enc = EncodedImages(recs, bb.transform)
    real = data.decode_jpeg
    refused = enc[1][1]

    def picky(inp, **kw):
        items = inp if isinstance(inp, list) else [inp]
        if any(t.numel() == refused.numel() and torch.equal(t, refused) for t in items):
            raise RuntimeError("unsupported JPEG")
        return real(inp, **kw)

    monkeypatch.setattr(data, "decode_jpeg", picky)
    cpu_calls = []

    def cpu_decode(i):
        cpu_calls.append(i)
        return enc.cpu[i]

    x, idx, bad = decode_encoded_batch(_batch(enc, range(3)), CPU, cpu_decode, bb.image_size,
                                       bb.decode_size(), bb.mean, bb.std)
    assert idx.tolist() == [0, 1, 2] and not bad and cpu_calls == [1]

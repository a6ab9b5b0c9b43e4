"""Caption files in the encodings people save them in: UTF-8 with or without a byte-order mark, UTF-16, and
Windows-1252 read by the stated fallback with a message naming the file; never mangled silently."""

import json

import pytest
from PIL import Image

from latentdiffusion.data import load_image_captions
from latentdiffusion.errors import DataError
from latentdiffusion.text_encoder import TextEncoder, TextEncoderConfig

CAFE = "don\u2019t go to the caf\u00e9"  # a typographic apostrophe and an accented e
ENCODED = {  # name -> (bytes on disk, the caption read, whether a message names the file)
    "utf8": ("a red circle".encode(), "a red circle", False),
    "bom": (b"\xef\xbb\xbfa red circle", "a red circle", False),
    "utf16": ("a red circle".encode("utf-16"), "a red circle", False),
    "cp1252": (CAFE.encode("cp1252"), CAFE, True),
}


@pytest.mark.parametrize("name", list(ENCODED))
def test_txt_caption_encodings(tmp_path, caplog, name):
    data, expected, named = ENCODED[name]
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(data)
    assert load_image_captions(str(tmp_path), 8)[0]["text"] == expected
    assert (f"{tmp_path / 'x.txt'} is not UTF-8" in caplog.text) == named
    assert "cp1252" in caplog.text if named else not caplog.text


def test_bom_does_not_reach_the_tokenizer(tmp_path):
    """The reported case: "a red circle" with a BOM tokenized to 7 tokens instead of 4 (BOS, a, red, circle, EOS: 5 ids
    before padding with the EOS token)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(ENCODED["bom"][0])
    encoder = TextEncoder(TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37))
    ids = encoder.tokenize([load_image_captions(str(tmp_path), 8)[0]["text"]])
    assert ids[0, :6].tolist() == encoder.tokenize(["a red circle"])[0, :6].tolist()
    assert ids[0, :6].tolist() == [49406, 320, 736, 7117, 49407, 49407]


def test_undecodable_txt_caption_skips_its_image_by_name(tmp_path, caplog):
    for name in ("good", "bad"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"\xff\x81\x8d")  # undefined in cp1252 too
    ds = load_image_captions(str(tmp_path), 8)
    assert len(ds) == 1 and ds[0]["text"] == "fine"
    assert "bad.png: caption file bad.txt is neither UTF-8, UTF-16 nor cp1252" in caplog.text


@pytest.mark.parametrize("name", ["bom", "cp1252", "utf16"])
def test_metadata_jsonl_encodings(tmp_path, caplog, name):
    """metadata.jsonl in the same encodings, with an image in a subfolder (file_name is relative to the file)."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "sub" / "x.png")
    line = json.dumps({"file_name": "sub/x.png", "text": CAFE}, ensure_ascii=False)
    data = {"bom": b"\xef\xbb\xbf" + line.encode(), "cp1252": line.encode("cp1252"), "utf16": line.encode("utf-16")}
    (tmp_path / "metadata.jsonl").write_bytes(data[name] + b"\n" if name != "utf16" else data[name])
    item = load_image_captions(str(tmp_path), 8, cache_dir=str(tmp_path / "cache"))[0]
    assert item["text"] == CAFE and item["pixel_values"][0].min() == 1.0
    assert (f"{tmp_path / 'metadata.jsonl'} is not UTF-8" in caplog.text) == (name == "cp1252")


def test_undecodable_metadata_names_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "x.png", "text": "\x81"}\n')
    with pytest.raises(DataError, match="metadata.jsonl is neither UTF-8"):
        load_image_captions(str(tmp_path), 8, cache_dir=str(tmp_path / "cache"))


def test_a_utf8_metadata_line_that_is_not_json_names_the_file_and_the_row(tmp_path):
    (tmp_path / "sub").mkdir()
    lines = []
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "sub" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": "a red circle"}))
    lines[2] = lines[2].replace('"a red circle"', "a red circle")  # unquoted: not JSON
    (tmp_path / "sub" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load_image_captions(str(tmp_path), 8, cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert f"{tmp_path / 'sub' / 'metadata.jsonl'} line 3 is not JSON" in message  # the file, and its line
    assert "row 2" in message  # datasets' own words, kept

"""Real-world manifests: nothing is lost in silence. Every row is a sample, a held-out image or a
counted skip with its line number; odd images convert with their full range; nothing hangs."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pogdiff.cli import main
from pogdiff.data.shards import DatasetIndex

SMALL = ["model.tiny_vae_steps=0", "prepare.backend=serial", "data.heldout_images=0", "data.image_size=32"]


def grey(value: int) -> Image.Image:
    return Image.new("RGB", (40, 40), (value, value, value))


def prepare(capsys, tmp_path, source, *extra) -> tuple[int, dict, str]:
    rc = main(["prepare", "configs/demo.yaml", f"output_dir={tmp_path / 'runs'}", f"data.source={source}", *SMALL, *extra])
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1]) if rc == 0 else {}
    return rc, result, out.err


def stored_image(dataset, key_prefix: str) -> np.ndarray:
    index = DatasetIndex.load(dataset)
    rows = {k: r for r, k in enumerate(index.keys)}
    for row, _, png in index.images():
        if index.keys[row].startswith(key_prefix):
            return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    raise AssertionError(f"no image with key {key_prefix}* among {sorted(rows)}")


@pytest.mark.timeout(300)
def test_jsonl_with_every_fault(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        grey(60 + 40 * i).save(data / f"ok{i}.png")
    grey(90).save(data / "a b.png")
    grey(150).save(data / "a_b.png")
    Image.fromarray((np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)).save(data / "deep.png")  # 16-bit
    Image.new("LA", (40, 40), (120, 255)).save(data / "la.png")
    Image.new("P", (40, 40), 0).save(data / "pal.png")
    os.mkfifo(data / "fifo.jpg")
    grey(10).save(tmp_path / "outside.png")
    rows = [{"image": f"ok{i}.png", "caption": f"a grey card {i}"} for i in range(3)]
    rows += [{"image": "a b.png", "caption": "space"}, {"image": "a_b.png", "caption": "underscore"},
             {"image": "deep.png", "caption": "sixteen bit"}, {"image": "la.png", "caption": "grey alpha"},
             {"image": "pal.png", "caption": "palette"}, {"image": "fifo.jpg", "caption": "a fifo"},
             {"image": "../outside.png", "caption": "escapes"}, {"image": str(tmp_path / "outside.png"), "caption": "absolute"}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(4, b'{"image": "ok0.png", "caption": "caf\xe9 latin-1"}')  # line 5: not UTF-8
    (data / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a BOM

    rc, result, err = prepare(capsys, tmp_path, data / "m.jsonl")
    assert rc == 0, err
    assert result["rows_in"] == 12 == result["samples"] + sum(result["skipped"].values())
    assert result["samples"] == 8  # 3 ok, both "a b" and "a_b", the 16-bit, LA and palette images
    assert result["skipped"] == {"bad_manifest_row": 1, "unreadable_file": 1, "outside_image_root": 2}
    dataset = result["output"]
    records = json.loads(open(f"{dataset}/dataset.json").read())["summary"]["skipped_records"]
    assert any(r["record"].startswith(f"{data / 'm.jsonl'}:5") and "not UTF-8" in r["detail"] for r in records)
    assert any("not a regular file" in r["detail"] for r in records)
    assert len({k for k in DatasetIndex.load(dataset).keys if k.startswith("a_b")}) == 2  # no key collision
    deep = stored_image(dataset, "deep")
    assert 100 < deep.mean() < 155 and deep.std() > 30  # the 16-bit gradient, not all white
    assert abs(stored_image(dataset, "la").mean() - 120) < 3 and stored_image(dataset, "pal").std() < 1

    rc, result, _ = prepare(capsys, tmp_path, data / "m.jsonl", "prepare.allow_outside_root=true",
                             f"prepare.output={tmp_path / 'o2'}")
    assert rc == 0 and result["samples"] == 10 and "outside_image_root" not in result["skipped"]


def test_csv_stray_quote_is_reported_with_its_lines(tmp_path, capsys):
    for i in range(7):
        grey(30 * i).save(tmp_path / f"im{i}.png")
    text = "\ufeffimage,caption\n" + "".join(
        f'im{i}.png,"a card {i}\n' if i == 2 else f"im{i}.png,a card {i}\n" for i in range(7))
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    rc, result, err = prepare(capsys, tmp_path, tmp_path / "m.csv")
    assert rc == 0, err
    assert result["rows_in"] == 7 == result["samples"] + result["skipped"]["bad_manifest_row"]
    assert result["samples"] == 2 and "7 rows in = 2 samples" in err
    records = json.loads(open(f"{result['output']}/dataset.json").read())["summary"]["skipped_records"]
    assert [r["record"].split(":")[-1] for r in records] == ["4", "5", "6", "7", "8"]
    assert all("unbalanced quote" in r["detail"] and "lines 4-8" in r["detail"] for r in records)



def test_csv_line_that_is_not_utf8_is_reported_where_it_stands(tmp_path, capsys):
    """The CSV reader streams: a line it cannot decode is a counted skip with its number, and the
    rows around it keep theirs (blank lines and all)."""
    for i in range(5):
        grey(40 * i).save(tmp_path / f"im{i}.png")
    lines = [b"\n", b"image,caption,identity\n", b"im0.png,a card 0,a\n", b"im1.png,caf\xe9 card,a\n", b"\n",
             b"im2.png,a card 2,b\n", b"im3.png,,b\n", b"im4.png,a card 4,b\n"]
    (tmp_path / "m.csv").write_bytes(b"".join(lines))
    rc, result, err = prepare(capsys, tmp_path, tmp_path / "m.csv")
    assert rc == 0, err
    assert result["rows_in"] == 5 and result["samples"] == 3
    records = json.loads(open(f"{result['output']}/dataset.json").read())["summary"]["skipped_records"]
    assert {(r["record"].split(" ")[0].split(":")[-1], r["reason"]) for r in records} == \
        {("4", "bad_manifest_row"), ("7", "empty_caption")}
    index = DatasetIndex.load(result["output"])
    assert sorted(index.keys) == ["im0", "im2", "im4"]

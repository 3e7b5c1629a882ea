"""MAFL: the CelebA subset of the MAFL benchmark (aligned CelebA images).

Layout (``--root`` points at the CelebA folder)::

    Img/img_align_celeba/000001.jpg ...
    Anno/list_landmarks_align_celeba.txt   line 1: image count; line 2: column names;
                                           then "NAME lefteye_x lefteye_y righteye_x righteye_y
                                           nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    MAFL/training.txt                      one image name per line (19,000)
    MAFL/testing.txt                       one image name per line (1,000)

Points (as in CelebA): left eye, right eye, nose, left mouth corner, right
mouth corner; inter-ocular normalisation on points 0, 1.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.datasets.annotations import (
    BadItem, Problems, check_in_image, checked_size, expand_box, frame, image_path, in_frame, parse_numbers, read_lines,
    require_file,
)
from pipeline.datasets.base import DatasetLoader, DatasetMeta, SkipRecord, manifest_row
from pipeline.datasets.mtfl import FACE5_GROW, FACE5_NAMES

_LAYOUT = (
    "<root>/Img/img_align_celeba/*.jpg, <root>/Anno/list_landmarks_align_celeba.txt, "
    "<root>/MAFL/training.txt and <root>/MAFL/testing.txt"
)


def read_celeba_landmarks(path: Path, problems: Problems) -> dict[str, tuple[int, list[str]]]:
    """Image name -> (line number, the 10 coordinate tokens), unparsed.

    Parsing is deferred to the images a split uses, so one bad line among
    202,599 only matters if that image is in the split. A count on line 1 that
    disagrees with the number of records means a truncated or edited file;
    that is reported at line 1.
    """
    lines = read_lines(path, problems.dataset)
    if len(lines) < 2:
        raise BadItem("landmark file has no header (expected a count line and a column-name line)", path, 1,
                      fix="restore Anno/list_landmarks_align_celeba.txt from the CelebA release")
    records: dict[str, tuple[int, list[str]]] = {}
    for lineno, text in enumerate(lines[2:], start=3):
        tokens = text.split()
        if tokens:
            records.setdefault(tokens[0], (lineno, tokens[1:]))
    declared = lines[0].strip()
    # Under skip_bad the images a truncation lost are reported one by one (as
    # "no entry"), so the count check only stops a strict load.
    if (not declared.isdigit() or int(declared) != len(records)) and not problems.skip_bad:
        problems.report(BadItem(
            f"line 1 declares {declared!r} images but the file has {len(records)} records (truncated or edited?)",
            path, 1, fix="restore Anno/list_landmarks_align_celeba.txt from the CelebA release",
        ))
    return records


class MAFLLoader(DatasetLoader):
    name = "mafl"
    meta = DatasetMeta(name="mafl", landmark_names=FACE5_NAMES, normalisation="interocular", norm_points=(0, 1))
    description = "MAFL (aligned CelebA): 5 face points, official 19k train / 1k test lists"
    expected_layout = _LAYOUT

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        problems = Problems(self.name, skip_bad, skipped)
        anno = require_file(root / "Anno" / "list_landmarks_align_celeba.txt", "CelebA landmark file", _LAYOUT, self.name)
        listing = require_file(root / "MAFL" / f"{'training' if split == 'train' else 'testing'}.txt",
                               f"MAFL {split} list", _LAYOUT, self.name)
        images_dir = root / "Img" / "img_align_celeba"
        try:
            records = read_celeba_landmarks(anno, problems)
        except BadItem as item:
            problems.report(item)
            return frame([])
        rows, seen = [], set()
        for lineno, text in enumerate(read_lines(listing, self.name), start=1):
            tokens = text.split()
            if not tokens:
                continue
            name = tokens[0]
            try:
                if name in seen:
                    raise BadItem(f"image {name!r} is listed twice", listing, lineno, fix="remove the duplicate line")
                seen.add(name)
                if name not in records:
                    raise BadItem(f"image {name!r} has no entry in {anno.name}", listing, lineno,
                                  fix="check the name, or restore the CelebA landmark file")
                anno_line, coords = records[name]
                values = parse_numbers(coords, 10, anno, anno_line, "the 5 CelebA points (10 numbers)")
                points = values.reshape(5, 2)
                image = image_path(images_dir, name, listing, lineno)
                width, height = checked_size(image, listing, lineno)
                check_in_image(points, width, height, anno, anno_line)
            except BadItem as item:
                problems.report(item)
                continue
            rows.append(manifest_row(image_id=name, split=split, path=str(image.absolute()), width=width,
                                     height=height, landmarks=points, visible=in_frame(points, width, height),
                                     bbox=expand_box(points, FACE5_GROW), box_source="landmarks"))
        return frame(rows)


__all__ = ["MAFLLoader", "read_celeba_landmarks"]

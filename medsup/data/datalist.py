"""Find the cases of a dataset folder: MSD layout (dataset.json) or a plain folder of images + labels.

Layouts, tried in this order:

1. **MSD** — ``dataset.json`` with a ``training`` list of ``{"image", "label"}`` paths relative to the root
   (and optionally ``test``). A listed ``x.nii.gz`` that exists only as nnU-Net's channel file
   ``x_0000.nii.gz`` is accepted. Paths that are absolute or escape the root are refused.
2. **Folders** — an image folder (``imagesTr``, ``images``, ``image``, ``img``) and a label folder
   (``labelsTr``, ``labels``, ``label``, ``masks``, ``segmentations``). An image and a label belong together
   when their names match after removing the image suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``,
   ``.mhd``) and, from image names, a ``_0000`` channel suffix: ``images/case7_0000.nii.gz`` pairs with
   ``labels/case7.nii.gz``. A sub-folder holding a DICOM series is an image named after the folder.
   Test images come from ``imagesTs`` (or ``images_test``).

Hidden files (``.*``, e.g. the ``._liver_0.nii.gz`` resource forks shipped in MSD Task03) are ignored.
Pairing problems are collected, not raised, so ``medsup data check`` can list every bad case at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from medsup.data.files import image_suffix, real_path, strip_suffix
from medsup.data.io import is_image_path

IMAGE_DIRS = ("imagesTr", "images", "image", "img")
LABEL_DIRS = ("labelsTr", "labels", "label", "masks", "segmentations")
TEST_DIRS = ("imagesTs", "images_test")
_CHANNEL = re.compile(r"_(\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: an image and (for training cases) its label."""

    case_id: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class Problem:
    """Something wrong with one case (or file), in words a user can act on."""

    case_id: str
    message: str


@dataclass
class Datalist:
    """The cases found under ``root`` and the pairing problems met on the way."""

    root: Path
    layout: str
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def labelled(self) -> list[Case]:
        """Training cases that have both image and label files."""
        return [c for c in self.training if c.label is not None]


def case_id_of(path: Path) -> tuple[str, int | None]:
    """``case7_0000.nii.gz`` -> ``("case7", 0)``; ``case7.nii.gz`` -> ``("case7", None)``."""
    stem = strip_suffix(path)
    match = _CHANNEL.search(stem)
    if match:
        return stem[: match.start()], int(match.group(1))
    return stem, None


def _inside(root: Path, relative: str, what: str, case_id: str, problems: list[Problem]) -> Path | None:
    """Resolve a dataset.json path; refuse absolute paths and paths escaping ``root``."""
    if "\0" in relative:  # the OS refuses it anyway, with a ValueError that names neither file nor case
        problems.append(Problem(case_id, f"{what} path {relative!r} in dataset.json holds a NUL byte"))
        return None
    if Path(relative).is_absolute():
        problems.append(Problem(case_id, f"{what} path {relative!r} in dataset.json is absolute; "
                                         "paths must be relative to the dataset folder"))
        return None
    candidate = real_path(root / relative)
    if not candidate.is_relative_to(real_path(root)):
        problems.append(Problem(case_id, f"{what} path {relative!r} in dataset.json escapes the dataset folder"))
        return None
    return root / Path(relative.removeprefix("./"))


def _with_channel(path: Path) -> Path:
    """nnU-Net renames MSD images to ``<id>_0000<suffix>``; accept that when the listed name is absent."""
    if path.exists():
        return path
    suffix = image_suffix(path)
    alt = path.with_name(strip_suffix(path) + "_0000" + suffix)
    return alt if alt.exists() else path


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_path(p))
    except OSError as err:  # e.g. a folder this user may not list: name it instead of a traceback
        raise ValueError(f"{folder}: cannot list the folder ({err.strerror or err})") from None


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _msd(root: Path, meta: dict) -> Datalist:
    out = Datalist(root, "msd")
    seen_labels: set[Path] = set()
    for i, entry in enumerate(meta.get("training") or []):
        if not isinstance(entry, dict) or "image" not in entry:
            out.problems.append(Problem(f"training[{i}]", "dataset.json entry lacks an 'image' path"))
            continue
        raw_image = str(entry["image"])
        case_id = case_id_of(Path(raw_image))[0]
        image = _inside(root, raw_image, "image", case_id, out.problems)
        label = _inside(root, str(entry["label"]), "label", case_id, out.problems) if entry.get("label") else None
        if image is None:
            continue
        image = _with_channel(image)
        if not image.exists():
            out.problems.append(Problem(case_id, f"image {image} listed in dataset.json does not exist"))
            continue
        if label is None or not label.exists():
            what = f"label {label} does not exist" if label is not None else "no label listed"
            out.problems.append(Problem(case_id, f"{what} (image {image})"))
            out.training.append(Case(case_id, image, None))
            continue
        seen_labels.add(real_path(label))
        out.training.append(Case(case_id, image, label))
    label_dir = _first_dir(root, LABEL_DIRS)
    if label_dir is not None:
        for label in _listdir(label_dir):
            if real_path(label) not in seen_labels:
                out.problems.append(Problem(case_id_of(label)[0], f"label {label} has no image in dataset.json"))
    for i, raw in enumerate(meta.get("test") or []):
        raw = str(raw.get("image", "")) if isinstance(raw, dict) else str(raw)
        if not raw:
            out.problems.append(Problem(f"test[{i}]", "dataset.json test entry lacks an 'image' path"))
            continue
        case_id = case_id_of(Path(raw))[0]
        image = _inside(root, raw, "test image", case_id, out.problems)
        if image is not None:
            image = _with_channel(image)
            if image.exists():
                out.test.append(Case(case_id, image))
            else:
                out.problems.append(Problem(case_id, f"test image {image} (test[{i}]) does not exist"))
    return out


def _folders(root: Path, image_dir: Path, label_dir: Path | None) -> Datalist:
    out = Datalist(root, "folders")
    images: dict[str, Path] = {}
    for path in _listdir(image_dir):
        case_id, channel = case_id_of(path)
        if channel not in (None, 0):
            out.problems.append(Problem(case_id, f"{path} is channel {channel}; medsup tasks take one CT channel"))
            continue
        if case_id in images:
            out.problems.append(Problem(case_id, f"two images for one case: {images[case_id]} and {path}"))
            continue
        images[case_id] = path
    labels: dict[str, Path] = {}
    if label_dir is not None:
        for path in _listdir(label_dir):
            labels[case_id_of(path)[0]] = path
    for case_id, image in images.items():
        label = labels.get(case_id)
        if label is None:
            out.problems.append(Problem(case_id, f"image {image} has no label in {label_dir or root}"))
        out.training.append(Case(case_id, image, label))
    for case_id, label in labels.items():
        if case_id not in images:
            out.problems.append(Problem(case_id, f"label {label} has no image in {image_dir}"))
    return out


def load_datalist(root: Path | str) -> Datalist:
    """Find the training and test cases under ``root`` (see the module docstring for the rules).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no recognisable layout.
        ValueError: ``dataset.json`` is not valid JSON, or a folder or file of the layout cannot be read.
    """
    root = Path(root)
    try:
        found = root.is_dir()
    except OSError as err:  # EACCES on a parent folder: is_dir() raises instead of saying False
        raise ValueError(f"{root}: cannot access the dataset folder ({err.strerror or err})") from None
    if not found:
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    meta_path = root / "dataset.json"
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_path}: cannot read it ({err})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object at the top level")
        for key in ("training", "test"):
            if not isinstance(meta.get(key) or [], list):
                raise ValueError(f"{meta_path}: '{key}' must be a list, not {type(meta[key]).__name__}")
    if meta.get("training"):
        out = _msd(root, meta)
    else:
        image_dir = _first_dir(root, IMAGE_DIRS)
        if image_dir is None:
            raise FileNotFoundError(
                f"{root}: no dataset.json with a 'training' list and no image folder "
                f"({', '.join(IMAGE_DIRS)}); see `medsup data check --help` for the layouts"
            )
        out = _folders(root, image_dir, _first_dir(root, LABEL_DIRS))
    if not out.test:
        test_dir = _first_dir(root, TEST_DIRS)
        if test_dir is not None:
            out.test = [Case(case_id_of(p)[0], p) for p in _listdir(test_dir)]
    return out

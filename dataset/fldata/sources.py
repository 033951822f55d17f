"""Reading a dataset's raw images as (x uint8 NHWC, y int64), official train and test splits pooled.

A ``--root`` may hold the dataset's own layout (torchvision's files, or the extracted
Tiny-ImageNet archive), one folder of images per class, or a ``.npz`` file with ``x`` uint8
(N,H,W) or (N,H,W,3) and ``y``. Images are converted to the dataset's channels and size.
"""
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from fldata.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset a script generates.

    ``read_native(spec, root, download)`` reads (after downloading, if asked) the dataset's own layout
    under ``root`` and returns None when that layout is absent; ``builtin(spec)`` loads data that needs
    no root at all.
    """
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    native_layout: str | None = None
    read_native: Callable[["DatasetSpec", str, bool], Arrays | None] | None = None
    builtin: Callable[["DatasetSpec"], Arrays] | None = None
    # Names of the labels 0..K-1 (written to config.json; FGL builds its prompts from them); None: unknown.
    class_names: tuple[str, ...] | None = None


def describe_source(spec: DatasetSpec, root: str | None) -> str:
    """Where the images come from, as recorded in the config's params."""
    return os.path.abspath(root) if root else f"built-in {spec.name} data"


def load_source(spec: DatasetSpec, root: str | None, download: bool) -> Arrays:
    """Returns (x uint8 (N,H,W,C) in the spec's shape, y int64 in [0, num_classes)).

    ``download`` fetches the dataset's own layout into ``root`` first; without ``root`` the spec's
    built-in data is used.
    """
    if root is None:
        if spec.builtin is None:
            raise DatasetError(f"{spec.name} needs its images: pass --download to fetch them, "
                               f"or --root with a local copy")
        images, labels = spec.builtin(spec)
    elif os.path.isfile(root) and not download:
        images, labels = read_npz(root, spec)
    elif download:
        images, labels = _download_and_read(spec, root)
    else:
        if not os.path.isdir(root):
            raise DatasetError(f"--root {root} does not exist; pass the folder or .npz file holding {spec.name}")
        found = spec.read_native(spec, root, download) if spec.read_native else None
        if found is None and _has_class_folders(root):
            found = read_image_folder(root, spec)
        if found is None:
            layouts = f"{spec.native_layout}, " if spec.native_layout else ""
            raise DatasetError(f"found no {spec.name} images under --root {root}: expected {layouts}"
                               f"one folder of images per class, or pass a .npz file")
        images, labels = found
    labels = _checked_labels(labels, len(images), spec)
    return fit_images(images, spec), labels


def _download_and_read(spec: DatasetSpec, root: str) -> Arrays:
    """Downloads into ``root`` and reads it; a failed download removes the folders it created, so the next
    attempt (or the suggested command) starts from where the user was, not from an empty ``rawdata/``."""
    created = os.path.abspath(root)
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    os.makedirs(root, exist_ok=True)
    try:
        found = spec.read_native(spec, root, True) if spec.read_native else None
        if found is None:
            raise DatasetError(f"{spec.name} has no download; pass --root with a local copy")
        return found
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def fit_images(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Converts uint8 (N,H,W) or (N,H,W,C) images to the spec's channels and size (bilinear)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DatasetError(f"images must be uint8, got {images.dtype}; pass pixel values 0..255")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(f"images must be shaped (N,H,W) or (N,H,W,3), got {images.shape}")
    channels, height, width = spec.image_shape
    if images.shape[1:] == (height, width, channels):
        return images
    fitted = []
    for image in tqdm(images, desc=f"resizing to {height}x{width}", leave=False, disable=None):
        fitted.append(_fit_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), spec))
    return np.stack(fitted)


def read_npz(path: str, spec: DatasetSpec) -> Arrays:
    if not path.endswith(".npz"):
        raise DatasetError(f"--root file {path} is not a .npz; pass a folder or a .npz with x and y")
    try:
        with np.load(path) as archive:
            return archive["x"], archive["y"]
    except KeyError:
        raise DatasetError(f"{path} must hold arrays 'x' (uint8 images) and 'y' (labels)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read {path} ({_first_line(exc)}); "
                           f"pass a .npz with x uint8 (N,H,W[,3]) and y") from None


def read_image_folder(root: str, spec: DatasetSpec) -> Arrays:
    """``root/<class_name>/<image>``, classes numbered in sorted name order."""
    class_names = _subfolders(root)
    if len(class_names) != spec.num_classes:
        raise DatasetError(f"--root {root} has {len(class_names)} class folders, "
                           f"{spec.name} needs {spec.num_classes}")
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        files = _image_files(os.path.join(root, class_name))
        if not files:
            raise DatasetError(f"class folder {os.path.join(root, class_name)} holds no images "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [label] * len(files)
    return _read_images(paths, spec), np.array(labels)


def read_tiny_imagenet_layout(base: str, spec: DatasetSpec) -> Arrays:
    """The extracted official archive: train/<wnid>/images/*, val/images/* labelled by val/val_annotations.txt."""
    wnids = sorted(set(_read_lines(os.path.join(base, "wnids.txt"))))
    if len(wnids) != spec.num_classes:
        raise DatasetError(f"{base}/wnids.txt lists {len(wnids)} classes, {spec.name} has {spec.num_classes}")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    paths, labels = [], []
    for wnid in wnids:
        files = _image_files(os.path.join(base, "train", wnid, "images"))
        paths += files
        labels += [label_of[wnid]] * len(files)

    annotations_path = os.path.join(base, "val", "val_annotations.txt")
    val_wnid = {}
    for line in _read_lines(annotations_path):
        fields = line.split()
        if len(fields) < 2:
            raise DatasetError(f"{annotations_path} has a line without file name and wnid: {line!r}")
        file_name, wnid = fields[:2]
        if wnid not in label_of:
            raise DatasetError(f"{annotations_path} labels {file_name} with {wnid}, which wnids.txt lacks")
        val_wnid[file_name] = wnid
    for path in _image_files(os.path.join(base, "val", "images")):
        file_name = os.path.basename(path)
        if file_name not in val_wnid:
            raise DatasetError(f"{annotations_path} has no label for {file_name}; restore the official file")
        paths.append(path)
        labels.append(label_of[val_wnid[file_name]])
    return _read_images(paths, spec), np.array(labels)


def _checked_labels(labels: np.ndarray, num_images: int, spec: DatasetSpec) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"labels must be {num_images} integers, got shape {labels.shape} of {labels.dtype}")
    if num_images == 0:
        raise DatasetError(f"the {spec.name} source holds no images; pass another --root")
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise DatasetError(f"labels span {labels.min()}..{labels.max()}, {spec.name} needs 0..{spec.num_classes - 1}")
    return labels.astype(np.int64)


def _fit_image(image: Image.Image, spec: DatasetSpec) -> np.ndarray:
    channels, height, width = spec.image_shape
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def _read_images(paths: list[str], spec: DatasetSpec) -> np.ndarray:
    if not paths:
        raise DatasetError(f"found no {spec.name} image files; pass --root with the complete dataset")
    images = []
    for path in tqdm(paths, desc=f"reading {spec.name} images", unit="img", disable=None):
        try:
            with Image.open(path) as image:
                images.append(_fit_image(image, spec))
        except OSError as exc:
            raise DatasetError(f"cannot read image {path} ({exc}); remove it or pass another --root") from None
    return np.stack(images)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            return [line.strip() for line in file if line.strip()]
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror}); pass --root with the complete dataset") from None


def _subfolders(root: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DatasetError(f"cannot list {folder} ({exc.strerror}); pass --root with the complete dataset") from None
    return [os.path.join(folder, name) for name in sorted(names)
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]


def _has_class_folders(root: str) -> bool:
    return any(_image_files(os.path.join(root, name)) for name in _subfolders(root))


def _torchvision_reader(class_name: str, splits: tuple[dict, ...]) -> Callable[[DatasetSpec, str, bool], Arrays | None]:
    """Reads a torchvision dataset class over all its ``splits`` (constructor keyword sets)."""
    def read(spec: DatasetSpec, root: str, download: bool) -> Arrays | None:
        import torchvision.datasets  # slow import, only for the datasets that need it

        dataset_class = getattr(torchvision.datasets, class_name)
        parts = []
        for split in splits:
            try:
                dataset = dataset_class(root, download=download, **split)
            except (OSError, RuntimeError) as exc:
                if download:
                    raise DatasetError(f"downloading {spec.name} into {root} failed ({_first_line(exc)}); "
                                       f"check the network or pass --root with a local copy") from None
                if isinstance(exc, RuntimeError):
                    return None  # torchvision's "Dataset not found": the caller tries the other layouts
                raise DatasetError(f"cannot read {spec.name} under {root} ({_first_line(exc)}); "
                                   f"pass --root with a complete copy, or --download") from None
            parts.append(_torchvision_arrays(dataset, spec))
        return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])
    return read


def _torchvision_arrays(dataset, spec: DatasetSpec) -> Arrays:
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):  # MNIST and CIFAR keep all images in memory
        return fit_images(np.asarray(dataset.data), spec), np.asarray(dataset.targets)
    images, labels = [], []
    for index in tqdm(range(len(dataset)), desc=f"reading {spec.name} images", unit="img", disable=None):
        image, label = dataset[index]
        images.append(_fit_image(image, spec))
        labels.append(label)
    return np.stack(images), np.array(labels)


def _read_tiny_imagenet(spec: DatasetSpec, root: str, download: bool) -> Arrays | None:
    if download:
        _download_tiny_imagenet(root)
    for base in (root, os.path.join(root, "tiny-imagenet-200")):
        if os.path.isfile(os.path.join(base, "wnids.txt")):
            return read_tiny_imagenet_layout(base, spec)
    return None


def _download_tiny_imagenet(root: str) -> None:
    if os.path.isfile(os.path.join(root, "tiny-imagenet-200", "wnids.txt")):
        return
    archive = os.path.join(root, "tiny-imagenet-200.zip")
    try:
        if not os.path.isfile(archive):
            with tqdm(desc="downloading Tiny-ImageNet", unit="B", unit_scale=True, disable=None) as progress:
                def report(blocks: int, block_size: int, total: int) -> None:
                    progress.total = total if total > 0 else None
                    progress.update(blocks * block_size - progress.n)
                urllib.request.urlretrieve(TINY_IMAGENET_URL, archive + ".part", reporthook=report)
            os.replace(archive + ".part", archive)  # a partial download never looks complete
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(root)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"downloading Tiny-ImageNet into {root} failed ({_first_line(exc)}); "
                           f"check the network or pass --root with the extracted tiny-imagenet-200") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _load_sklearn_digits(spec: DatasetSpec) -> Arrays:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target


# Label names in label order, as the datasets' own metadata lists them (torchvision's `classes`, CIFAR's meta files;
# Flowers102's names are the ones published with the dataset, in label order). Underscores become spaces, since
# they end up in text prompts.
DIGIT_NAMES = ("digit zero", "digit one", "digit two", "digit three", "digit four", "digit five", "digit six",
               "digit seven", "digit eight", "digit nine")
FASHION_MNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle boot")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_NAMES = tuple(name.replace("_", " ") for name in """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm""".split())
FLOWERS102_NAMES = tuple(name.strip() for name in """
pink primrose, hard-leaved pocket orchid, canterbury bells, sweet pea, english marigold, tiger lily, moon orchid,
bird of paradise, monkshood, globe thistle, snapdragon, colt's foot, king protea, spear thistle, yellow iris,
globe-flower, purple coneflower, peruvian lily, balloon flower, giant white arum lily, fire lily, pincushion flower,
fritillary, red ginger, grape hyacinth, corn poppy, prince of wales feathers, stemless gentian, artichoke,
sweet william, carnation, garden phlox, love in the mist, mexican aster, alpine sea holly, ruby-lipped cattleya,
cape flower, great masterwort, siam tulip, lenten rose, barbeton daisy, daffodil, sword lily, poinsettia,
bolero deep blue, wallflower, marigold, buttercup, oxeye daisy, common dandelion, petunia, wild pansy, primula,
sunflower, pelargonium, bishop of llandaff, gaura, geranium, orange dahlia, pink-yellow dahlia, cautleya spicata,
japanese anemone, black-eyed susan, silverbush, californian poppy, osteospermum, spring crocus, bearded iris,
windflower, tree poppy, gazania, azalea, water lily, rose, thorn apple, morning glory, passion flower, lotus,
toad lily, anthurium, frangipani, clematis, hibiscus, columbine, desert-rose, tree mallow, magnolia, cyclamen,
watercress, canna lily, hippeastrum, bee balm, ball moss, foxglove, bougainvillea, camellia, mallow,
mexican petunia, bromelia, blanket flower, trumpet creeper, blackberry lily""".split(","))


_TRAIN_AND_TEST = ({"train": True}, {"train": False})

MNIST = DatasetSpec("MNIST", 10, (1, 28, 28), "torchvision's MNIST/raw files",
                    _torchvision_reader("MNIST", _TRAIN_AND_TEST), class_names=DIGIT_NAMES)
FASHION_MNIST = DatasetSpec("FashionMNIST", 10, (1, 28, 28), "torchvision's FashionMNIST/raw files",
                            _torchvision_reader("FashionMNIST", _TRAIN_AND_TEST), class_names=FASHION_MNIST_NAMES)
CIFAR10 = DatasetSpec("Cifar10", 10, (3, 32, 32), "torchvision's cifar-10-batches-py",
                      _torchvision_reader("CIFAR10", _TRAIN_AND_TEST), class_names=CIFAR10_NAMES)
CIFAR100 = DatasetSpec("Cifar100", 100, (3, 32, 32), "torchvision's cifar-100-python",
                       _torchvision_reader("CIFAR100", _TRAIN_AND_TEST), class_names=CIFAR100_NAMES)
FLOWERS102 = DatasetSpec("Flowers102", 102, (3, 64, 64), "torchvision's flowers-102",
                         _torchvision_reader("Flowers102", ({"split": "train"}, {"split": "val"}, {"split": "test"})),
                         class_names=FLOWERS102_NAMES)
# Tiny-ImageNet's names live in the archive's words.txt (WordNet ids to synonyms); not read yet, so no names.
TINY_IMAGENET = DatasetSpec("TinyImagenet", 200, (3, 64, 64),
                            "tiny-imagenet-200/ (wnids.txt, train/, val/val_annotations.txt)", _read_tiny_imagenet)
DIGITS = DatasetSpec("Digits", 10, (3, 32, 32), builtin=_load_sklearn_digits, class_names=DIGIT_NAMES)
SPECS = {spec.name: spec for spec in (MNIST, FASHION_MNIST, CIFAR10, CIFAR100, FLOWERS102, TINY_IMAGENET, DIGITS)}

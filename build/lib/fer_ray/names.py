"""The project's fixed vocabularies, one home each: classes, official usages, run splits and their roles, data
formats, duplicate-removal modes and known GPU memory sizes. Torch-free and import-free, so the config leaf and
every layer can use them."""

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""FER-2013's seven expressions, in label order (label k is ``CLASSES[k]``)."""
USAGES = ("Training", "PublicTest", "PrivateTest")
"""The official Kaggle split of each image (``FERData.usage`` codes index this)."""
SPLITS = ("train", "val", "public_test", "private_test")
"""A run's splits, in report order after ``train``."""
SPLIT_USAGE = {"train": "Training", "val": "Training", "public_test": "PublicTest", "private_test": "PrivateTest"}
"""The official usage each run split is drawn from (``val`` is carved out of Training)."""
SPLIT_ROLES = {"train": "fit", "val": "select", "public_test": "report", "private_test": "report"}
"""``fit`` trains, ``select`` chooses trials, members, weights and temperatures, ``report`` is only scored."""
FORMATS = ("csv", "folders", "torchvision")
"""Dataset layouts the loaders read (``fer_ray.data.ingest``); ``auto`` detects one."""
DEDUP_MODES = ("none", "within", "leakage", "both")
"""``DataConfig.dedup``: duplicate removal after loading (``fer_ray.data.quality.dedup``)."""

PATH_NAME = r"[A-Za-z0-9._-]+"
"""What a name that becomes a file or folder name may hold (sweep, experiment, ensemble, student, split names)."""


def path_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one path component (``None`` if it can): ``[A-Za-z0-9._-]+``, not ``.`` or ``..``."""
    import re

    if not isinstance(name, str) or not re.fullmatch(PATH_NAME, name) or name in (".", ".."):
        return f"{name!r} cannot be a file name: use letters, digits, '.', '_' and '-' (not '.' or '..')"
    return None

GPU_MEMORY_GB = {"A100": 40, "A100-80G": 80, "H100": 80, "L4": 24, "T4": 16, "V100": 16, "GeForce-RTX-3090": 24,
                 "GeForce-GTX-1080-Ti": 11, "A10G": 24}
"""Memory of known GPUs, by Ray accelerator type name (Ray names every A100 ``A100``: 40 GB is the safe side)."""

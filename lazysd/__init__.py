"""lazysd: lazy, native-key, rank-local state dicts over Hugging Face safetensors checkpoints.

    from lazysd import VirtualStateDict
    model.load_state_dict(VirtualStateDict("/ckpt/Step-3.5-Flash"))
"""

from .errors import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    ConfigError,
    ExportError,
    FileChangedError,
    HeaderError,
    LazySDError,
    MissingKeyError,
    MissingSourceError,
    NoWeightsError,
    OptionError,
    PlacementError,
    ReadOnlyTensorError,
    RemoteAccessError,
    RemoteReadError,
    RuleError,
    ShapeMismatchError,
    StateDictMismatchError,
    TooManyFilesError,
    UnclaimedKeyError,
    UnknownModelError,
    UnsafePathError,
    UnsupportedFormatError,
    WriterError,
)
from .export import HFView, save_hf
from .lazy import LazyTensor
from .load import LoadReport, load
from .virtual import VirtualStateDict

__all__ = [
    "VirtualStateDict",
    "LazyTensor",
    "load",
    "LoadReport",
    "HFView",
    "save_hf",
    "LazySDError",
    "CheckpointIndexError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ExportError",
    "FileChangedError",
    "HeaderError",
    "MissingKeyError",
    "MissingSourceError",
    "NoWeightsError",
    "PlacementError",
    "ShapeMismatchError",
    "StateDictMismatchError",
    "UnclaimedKeyError",
    "UnknownModelError",
    "UnsafePathError",
    "ReadOnlyTensorError",
    "TooManyFilesError",
    "UnsupportedFormatError",
    "OptionError",
    "RuleError",
    "WriterError",
    "RemoteAccessError",
    "RemoteReadError",
]
__version__ = "0.1.0"

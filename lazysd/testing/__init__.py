"""Synthetic checkpoints with real layouts and small reference models, for users, examples and tests.

Test-only infrastructure (hostile-case builders, page-cache probes, peak-memory measurement,
the gloo rank runner, bitwise checks) lives with the tests, in ``tests/support/``.

Example:
    >>> import tempfile
    >>> from lazysd.testing import Step3p5Spec, make_checkpoint
    >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
    >>> ckpt = make_checkpoint(tmp.name, Step3p5Spec.tiny(), layout="single")
    >>> sorted(p.name for p in ckpt.iterdir())
    ['config.json', 'model.safetensors']
"""

from lazysd.testing.models import HFMoE, NativeMoE, Step3p5Model
from lazysd.testing.step3p5 import (
    INDEX_NAME,
    SINGLE_NAME,
    Step3p5Spec,
    checkpoint_nbytes,
    config_dict,
    ensure_checkpoint,
    hf_tensor_specs,
    load_hf_tensors,
    make_checkpoint,
    native_state_dict,
    native_tensor_specs,
)

__all__ = [
    "HFMoE",
    "INDEX_NAME",
    "NativeMoE",
    "SINGLE_NAME",
    "Step3p5Model",
    "Step3p5Spec",
    "checkpoint_nbytes",
    "config_dict",
    "ensure_checkpoint",
    "hf_tensor_specs",
    "load_hf_tensors",
    "make_checkpoint",
    "native_state_dict",
    "native_tensor_specs",
]

"""Messages other libraries print that say nothing to a user of this package, filtered where they are logged.

torchao, which peft and transformers import whenever it is installed (the `quant` extra), logs at every import on
a CPU-only torch that its CUDA kernels' libraries do not load ("Failed to load .../_C_cutlass_90a.abi3.so"), and
torch logs that torchao registers enums in a way it deprecates. This package uses only torchao's Python paths on
a CPU, so on a CPU-only torch these lines are dropped; on a CUDA build a kernel library that fails to load is
news, and its line stays.
"""

from __future__ import annotations

import logging
import sys

DEPRECATED_ENUM = "is an Enum subclass and is now natively supported by torch.compile"


def _cpu_only_torch() -> bool:
    torch = sys.modules.get("torch")  # loaded by whoever imported torchao; never imported here
    return torch is not None and torch.version.cuda is None


def _torchao_record(record: logging.LogRecord) -> bool:
    return not (_cpu_only_torch() and record.getMessage().startswith("Failed to load "))


def _pytree_record(record: logging.LogRecord) -> bool:
    return DEPRECATED_ENUM not in record.getMessage()


def quiet_library_messages() -> None:
    """Install the filters (idempotent): on the loggers, so they hold whoever imports torchao, and when."""
    for name, keep in (("torchao", _torchao_record), ("torch.utils._pytree", _pytree_record)):
        logger = logging.getLogger(name)
        if keep not in logger.filters:
            logger.addFilter(keep)

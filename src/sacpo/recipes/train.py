"""`sacpo train`: one alignment stage, with the settings the commands use.

The commands differ from the Python API in one default only: glibc's malloc thresholds (`malloc_tuning`) are
process-wide, so `sacpo.train.config.TrainConfig` leaves them off, and every command-line job — `sacpo train`, the
stages of `sacpo pipeline` and of `sacpo demo` — builds its stage configs as `CommandTrainConfig`, where they are on
unless the config says `malloc_tuning: false`.
"""

from __future__ import annotations

from sacpo.config import config_dataclass, help_field
from sacpo.train.config import TrainConfig


@config_dataclass
class CommandTrainConfig(TrainConfig):
    """TrainConfig as the sacpo commands build it: the same fields, malloc_tuning on by default."""

    malloc_tuning: bool = help_field(
        True,
        help="on glibc, fix malloc's mmap/trim thresholds so the step's large buffers are reused from the heap "
        "instead of mapped and unmapped every step (process-wide; sacpo.train.allocator). On for the sacpo "
        "commands, off in the Python API (sacpo.train.config.TrainConfig)",
    )

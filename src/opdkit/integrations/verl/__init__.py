"""opdkit's drift-gated OPD / LSM / SG-OPD losses as a verl 0.9.1 plugin (README "At scale on verl").

Importing this package checks the verl version and registers ``loss_mode`` ``opdkit_opd``,
``opdkit_lsm`` and ``opdkit_sg_opd`` with verl's distillation-loss registry, plus the FSDP engine hook
under vendor ``opdkit``. verl imports it in every Ray worker through the loss config's hydra
``_target_: opdkit.integrations.verl.config.OpdkitDistillationLossConfig``.
"""

from __future__ import annotations

import verl

from opdkit.integrations.verl.guards import check_verl_version

check_verl_version(verl.__version__)

from opdkit.integrations.verl import engine, losses  # noqa: E402  (registers the losses and the engine hook)
from opdkit.integrations.verl.config import OpdkitDistillationLossConfig  # noqa: E402

__all__ = ["OpdkitDistillationLossConfig", "engine", "losses"]

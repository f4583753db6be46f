"""Worker pools from a deployment: `count` workers per role, each a TP gang of the role's `tp_size`."""
from __future__ import annotations

import enum

from pdserve.cluster.tp_gang import TPGang
from pdserve.config import DeploymentConfig, PoolConfig


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def pool_config(config: DeploymentConfig, role: Role) -> PoolConfig:
    return config.prefill if role is Role.PREFILL else config.decode


class WorkerPool:
    def __init__(self, config: DeploymentConfig, role: Role):
        self.role = role
        pool = pool_config(config, role)
        self.workers: list[TPGang] = []
        try:
            for _ in range(pool.count):
                self.workers.append(TPGang(config, pool.tp_size))
        except BaseException:
            self.shutdown()  # a pool comes up whole or not at all: nothing half-started is left behind
            raise

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()
        self.workers = []

"""The coordinator's step from the sites' average to the next global model.

``federation.server_optimizer.name``: ``fedavg`` takes the example-weighted average as the next
global model; ``fedavgm`` (server momentum, Hsu et al. 2019), ``fedadam`` and ``fedyogi``
(adaptive federated optimisation, Reddi et al. 2021) treat ``average - global`` as a
pseudo-gradient. The arithmetic is Flower's own (``flwr.serverapp.strategy.FedAvgM``,
``FedAdam``, ``FedYogi``): each is given the average as the single "reply" of a round, so the
same step applies in plain mode and under SecAgg+, where the coordinator holds nothing but the
securely aggregated average. The optimiser's moments live in the coordinator's memory: a
resumed coordinator restarts them from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi
from omegaconf import DictConfig

from pipeline.contracts.messages import ARRAYS, METRICS, NUM_EXAMPLES

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


class ServerOptimizer:
    """One of :data:`SERVER_OPTIMIZERS`, configured from ``federation.server_optimizer``."""

    def __init__(self, settings: DictConfig | dict | None) -> None:
        settings = dict(settings or {"name": "fedavg"})
        self.name = str(settings.get("name", "fedavg"))
        lr = float(settings.get("server_lr", 1.0))
        adaptive: dict[str, Any] = {
            "eta": lr,
            "beta_1": float(settings.get("beta_1", 0.9)),
            "beta_2": float(settings.get("beta_2", 0.99)),
            "tau": float(settings.get("tau", 1e-3)),
        }
        builders = {
            "fedavg": lambda: None,
            "fedavgm": lambda: FedAvgM(
                server_learning_rate=lr, server_momentum=float(settings.get("server_momentum", 0.9))
            ),
            "fedadam": lambda: FedAdam(**adaptive),
            "fedyogi": lambda: FedYogi(**adaptive),
        }
        if self.name not in builders:
            raise ValueError(
                f"federation.server_optimizer.name={self.name!r}: expected one of "
                f"{', '.join(SERVER_OPTIMIZERS)}"
            )
        self.strategy = builders[self.name]()

    def step(self, server_round: int, current: ArrayRecord, average: ArrayRecord) -> ArrayRecord:
        """The next global model from the one sent (``current``) and the sites' ``average``."""
        if self.strategy is None:
            return average
        if isinstance(self.strategy, FedAvgM):
            self.strategy.current_arrays = current
        else:
            self.strategy.current_arrays = {k: a.numpy() for k, a in current.items()}
        reply = _AverageReply(RecordDict({ARRAYS: average, METRICS: MetricRecord({NUM_EXAMPLES: 1})}))
        # The strategies read only has_error() and content of a reply: _AverageReply stands in for a Message.
        stepped, _ = self.strategy.aggregate_train(server_round, [cast(Message, reply)])
        if stepped is None:
            raise RuntimeError(f"{self.name} made no model from the sites' average")
        dtypes = {k: a.numpy().dtype for k, a in average.items()}
        return ArrayRecord({k: Array(_as(a.numpy(), dtypes[k])) for k, a in stepped.items()})


@dataclass
class _AverageReply:
    """The sites' average in the shape of a single reply: all Flower's strategies read of one."""

    content: RecordDict

    def has_error(self) -> bool:
        return False


def _as(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The stepped array in the model's dtype (integer buffers rounded)."""
    return np.asarray(np.rint(array) if np.issubdtype(dtype, np.integer) else array).astype(dtype)

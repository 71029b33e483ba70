"""Every key of a Flower message record and of a SuperNode's node config that fedrad uses.

Both sides read and write them through this module: the coordinator's records
(:data:`CONFIG_KEY`, :data:`RUN_ID_KEY`, :data:`ROUND_KEY`, the SecAgg+ :data:`STAMP` record),
the sites' replies (:data:`NUM_EXAMPLES`, :data:`THRESHOLD_COUNTS`), and the node config a
deployed site's SuperNode is started with (:class:`NodeConfig`: written by ``scripts/site.py``,
read by the ClientApp).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_KEY = "fedrad-config"  # the experiment as JSON text
RUN_ID_KEY = "fedrad-run-id"  # the federation's own run id: stable across coordinator restarts
ROUND_KEY = "server-round"
NUM_EXAMPLES = "num-examples"  # a site's aggregation weight, in its metrics
STAMP = "fedrad"  # the config record with the experiment, run and round on every SecAgg+ stage
ARRAYS = "arrays"  # the record names of Flower's strategies: model, metrics, configuration
METRICS = "metrics"
CONFIG = "config"
LEDGER_HEAD = "ledger"  # a site's ledger head (seq, head, key id) in its evaluation reply
# A site's validation images called pneumonia at each threshold of a fixed grid, in its
# evaluation reply (pipeline.evaluation.threshold): those with pneumonia, those without.
THRESHOLD_COUNTS = "threshold-counts"
POSITIVES_CALLED = "positives-called"
NEGATIVES_CALLED = "negatives-called"
OUTPUT_DIR_KEY = "output-dir"  # the deployed ServerApp's run config: where the run writes
PARTITION_ID = "partition-id"  # set by Flower's simulation engine for each simulated node
SITE = "site"  # a site's reply: the config record with its own name (SITE_NAME)
SITE_NAME = "name"
FINISHED = "query.finished"  # the coordinator's last message of a run: the federation is finished
# SecAgg+ training messages use Flower's legacy layout (pipeline.federation.secure_aggregation):
# its records of the fit instruction, and the names of its unnamed arrays in the fit config.
LEGACY_FIT_CONFIG = "fitins.config"
LEGACY_FIT_ARRAYS = "fitins.parameters"
ARRAY_NAMES = "array-names"
# A deployed message's arrays packed into one (pipeline.contracts.packing): the record with the
# one byte array, and the config record with its layout.
PACKED = "fedrad-packed"
PACKING = "fedrad-packing"
# A site's reply: the config record with the SHA-256 of the packed arrays it holds, which the
# coordinator may then refer to instead of sending them again.
HOLDS = "fedrad-holds"


@dataclass(frozen=True)
class NodeConfig:
    """A deployed site's own settings, passed to its SuperNode with ``--node-config``.

    The site decides these, never the coordinator: its name, where its work folder is, whether jobs need
    its data owner's approval, whether debug (seeded) noise is allowed, what to do with a round
    asked again, and its standing privacy budget, a cap on what any job may spend.
    """

    work_dir: Path
    site_name: str | None = None
    require_approval: bool = True
    auto_approve: bool = False
    allow_seeded_noise: bool = False
    retrain_round: str = "refuse"
    epsilon_budget: float | None = None

    KEYS = {
        "work_dir": "work-dir",
        "site_name": "site-name",
        "require_approval": "require-approval",
        "auto_approve": "auto-approve",
        "allow_seeded_noise": "allow-seeded-noise",
        "retrain_round": "retrain-round",
        "epsilon_budget": "epsilon-budget",
    }

    def flag(self) -> str:
        """The ``--node-config`` value: ``key=value`` pairs, strings quoted."""
        parts = []
        for field, key in self.KEYS.items():
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool):
                parts.append(f"{key}={str(value).lower()}")
            elif isinstance(value, float):
                parts.append(f"{key}={value!r}")
            else:
                parts.append(f"{key}='{Path(value).resolve() if field == 'work_dir' else value}'")
        return " ".join(parts)

    def as_node_config(self) -> dict[str, Any]:
        """The node config a SuperNode parses from :meth:`flag` (as Flower passes it to the app)."""
        values = {key: getattr(self, field) for field, key in self.KEYS.items()}
        values[self.KEYS["work_dir"]] = str(Path(self.work_dir).resolve())
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def read(cls, node_config: Mapping[str, Any]) -> "NodeConfig | None":
        """The settings of a deployed site, or None for a simulated node (no ``work-dir``)."""
        if cls.KEYS["work_dir"] not in node_config:
            return None
        keys = cls.KEYS
        budget = node_config.get(keys["epsilon_budget"])
        name = node_config.get(keys["site_name"])
        return cls(
            work_dir=Path(str(node_config[keys["work_dir"]])),
            site_name=None if name is None else str(name),
            require_approval=bool(node_config.get(keys["require_approval"], True)),
            auto_approve=bool(node_config.get(keys["auto_approve"], False)),
            allow_seeded_noise=bool(node_config.get(keys["allow_seeded_noise"], False)),
            retrain_round=str(node_config.get(keys["retrain_round"], "refuse")),
            epsilon_budget=None if budget is None else float(budget),
        )

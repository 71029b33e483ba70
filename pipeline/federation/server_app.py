"""The coordinator's Flower ServerApp: FedAvg over the sites, a checkpoint every round.

The coordinator holds no data: it starts from a freshly initialised (or locally loaded)
model, sends it with the experiment config to the sites, averages their updates weighted
by their training-example counts, and checkpoints the global model after every round.
With ``federation.secure_aggregation=true`` the averaging runs under SecAgg+
(:mod:`pipeline.federation.secure_aggregation`): the coordinator sees only the sum.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from omegaconf import DictConfig, OmegaConf

from pipeline.contracts.console import ConsoleFormatter
from pipeline.contracts.experiment import experiment_yaml
from pipeline.contracts.layout import RunLayout
from pipeline.contracts.messages import CONFIG, CONFIG_KEY, FINISHED, OUTPUT_DIR_KEY, ROUND_KEY, RUN_ID_KEY
from pipeline.federation.grids import PromptGrid
from pipeline.federation.resume import (
    fedrad_run_id,
    recorded_rounds,
    resume_point,
    rounds_left,
)
from pipeline.federation.secure_aggregation import run_secure_federation
from pipeline.federation.selection import EarlyStop, RoundSelector
from pipeline.federation.server_optimizer import ServerOptimizer
from pipeline.federation.strategy import RecordingFedAvg, TooFewSites
from pipeline.training.checkpoints import save_checkpoint
from pipeline.training.loop import build_classifier

log = logging.getLogger("fedrad.federation")


class RoundCheckpointer:
    """Called by the strategy after every round with the global parameters: saves
    ``checkpoints/round_NNN.pt`` and, when no selection metric is configured
    (``federation.selection.metric: null``), refreshes ``model.pt``; otherwise the round
    selection (:mod:`pipeline.federation.selection`) decides which round ``model.pt`` is.
    Flower's round 1 of a run resumed after ``completed_rounds`` is round ``completed_rounds + 1``."""

    def __init__(
        self, output_dir: Path, cfg: DictConfig, selector: RoundSelector, completed_rounds: int = 0
    ) -> None:
        self.output_dir = output_dir
        self.cfg = cfg
        self.selector = selector
        self.completed_rounds = completed_rounds

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> None:
        if flower_round == 0:
            return None
        server_round = self.completed_rounds + flower_round
        state = arrays.to_torch_state_dict()
        round_path = RunLayout(self.output_dir).checkpoint(server_round)
        save_checkpoint(round_path, state, self.cfg, extra={"round": server_round})
        if self.selector.metric is None:
            self.selector.release(server_round)
        self.selector.release_if_best(server_round)
        log.info("round %d  global model saved to %s", server_round, round_path)
        return None


def run_federation(
    grid: Grid, cfg: DictConfig, output_dir: Path, context: Context | None = None
) -> Result | None:
    """Run ``federation.num_rounds`` rounds of FedAvg over the sites connected to ``grid``.

    A restart on the same ``output_dir`` continues after the last completed round
    (:mod:`pipeline.federation.resume`). Returns Flower's result in plain mode (``None``
    under secure aggregation, whose legacy workflow keeps its own history, and when no round
    is left); stops early, with a logged reason, when fewer than ``federation.min_sites``
    sites train in a round.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg.federation
    run_id = fedrad_run_id(output_dir, cfg)
    start = resume_point(output_dir)
    history = [json.loads(line) for _, line in sorted(recorded_rounds(output_dir).items())]
    remaining = int(fed.num_rounds) - start.completed_round
    if remaining <= 0 or any(r.get("stopped_early") for r in history):
        log.info("run %s in %s is finished (%d rounds)", run_id, output_dir, start.completed_round)
        return None
    initial = start.state or build_classifier(cfg, seed=int(cfg.seed)).net.state_dict()
    selection = fed.get("selection") or {}
    selector = RoundSelector(output_dir, selection.get("metric"), selection.get("patience"), history)
    strategy = RecordingFedAvg(
        rounds_file=RunLayout(output_dir).rounds,
        completed_rounds=start.completed_round,
        server_optimizer=ServerOptimizer(fed.get("server_optimizer")),
        selector=selector,
        fraction_train=float(fed.fraction_train),
        fraction_evaluate=float(fed.fraction_evaluate),
        min_train_nodes=int(fed.min_sites),
        min_evaluate_nodes=int(fed.min_sites),
        min_available_nodes=int(fed.get("min_available_sites") or fed.min_sites),
    )
    shared = {CONFIG_KEY: experiment_yaml(cfg), RUN_ID_KEY: run_id}
    checkpointer = RoundCheckpointer(output_dir, cfg, selector, start.completed_round)
    try:
        if fed.get("secure_aggregation"):
            context = context or Context(
                run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}
            )
            numpy_state = {k: v.detach().cpu().numpy() for k, v in initial.items()}
            run_secure_federation(grid, context, cfg, strategy, numpy_state, shared, checkpointer)
            return None
        return strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=remaining,
            timeout=float(fed.round_timeout_s),
            train_config=ConfigRecord(cast(dict[str, ConfigRecordValues], shared)),
            evaluate_config=ConfigRecord(cast(dict[str, ConfigRecordValues], shared)),
            evaluate_fn=checkpointer,
        )
    except TooFewSites as stop:
        log.error("%s", stop)
        return None
    except EarlyStop as stop:
        log.info("%s", stop)
        return None
    finally:
        _release_last_if_unselected(output_dir, selector)


def _release_last_if_unselected(output_dir: Path, selector: RoundSelector) -> None:
    """With a selection metric but no round ever scored, release the last round's model."""
    rounds = RunLayout(output_dir).checkpoint_rounds()
    if selector.metric is not None and selector.best is None and rounds:
        selector.release(rounds[-1])
        log.warning("no round was scored on %s: releasing the last round (%d)", selector.metric, rounds[-1])


def make_server_app(cfg: DictConfig, output_dir: Path) -> ServerApp:
    """A ServerApp bound to an already composed config (used by the simulation)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, output_dir, context)

    return server


def announce_finished(grid: Grid, cfg: DictConfig, output_dir: Path) -> None:
    """Tell every connected site that the federation in ``output_dir`` is finished (a deployed
    site then stops, unless it is configured to keep serving); nothing while rounds are left."""
    if rounds_left(output_dir, int(cfg.federation.num_rounds)):
        return
    rounds = RunLayout(output_dir).checkpoint_rounds()
    stamp = {
        CONFIG_KEY: experiment_yaml(cfg),
        RUN_ID_KEY: fedrad_run_id(output_dir, cfg),
        ROUND_KEY: rounds[-1] if rounds else 1,
    }
    record = ConfigRecord(cast(dict[str, ConfigRecordValues], stamp))
    messages = [Message(RecordDict({CONFIG: record}), node, FINISHED) for node in grid.get_node_ids()]
    timeout = min(float(cfg.federation.round_timeout_s), 120.0)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    told = sum(not reply.has_error() for reply in replies)
    log.info("told %d of %d connected sites that the federation is finished", told, len(messages))


app = ServerApp()


def _log_to_console() -> None:
    """A deployed ServerApp streams its console to ``flwr run``: show fedrad's progress there,
    in the console format of every entry point (:class:`ConsoleFormatter`)."""
    fedrad = logging.getLogger("fedrad")
    if not fedrad.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(ConsoleFormatter())
        fedrad.addHandler(handler)
        fedrad.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: the run config names the resolved experiment config file."""
    _log_to_console()
    config_path = Path(str(context.run_config[CONFIG_KEY]))
    cfg = cast(DictConfig, OmegaConf.load(config_path))  # the resolved experiment: a mapping
    output_dir = Path(str(context.run_config.get(OUTPUT_DIR_KEY, "outputs/federation")))
    grid = PromptGrid(grid)  # replies collected as they arrive, not every 3 s
    run_federation(grid, cfg, output_dir, context)
    announce_finished(grid, cfg, output_dir)

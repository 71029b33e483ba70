"""Flower's SecAgg+ around our ServerApp and ClientApp (``federation.secure_aggregation=true``).

Flower 1.41 ships SecAgg+ as a workflow of its legacy API: the server runs
:class:`flwr.server.workflow.SecAggPlusWorkflow` inside a ``DefaultWorkflow`` that drives a
legacy ``Strategy``, and each site runs the client mod ``secaggplus_mod``, which masks the
legacy fit result (unnamed arrays, ``fitres.*`` records) of the training handler. This module
bridges the two layouts so that the ClientApp's handlers, the site's training code and the
round records stay the same in both modes:

* :func:`secure_aggregation_mod` (site): translates a SecAgg+ training message into the
  ordinary ``arrays`` + ``config`` message, and the handler's ``arrays`` + ``metrics`` reply
  into the legacy fit result the SecAgg+ mod masks. Plain messages pass through untouched. It
  tells the handler which sites the update is masked against
  (:data:`pipeline.federation.releases.MASKING_NEIGHBOURS`), and before the unmasking stage
  checks that a round released before is unmasked with the same survivors and dropped sites
  (:class:`pipeline.federation.releases.ReleaseStore`).
* :class:`ExperimentStampingGrid` (coordinator): adds the experiment, run and round to every
  SecAgg+ stage message, so that each site's approval gate can check every stage.
* :class:`SecureFitStrategy` (coordinator): the legacy strategy SecAgg+ drives; it only ever
  receives the unmasked *sum* (already divided by the summed weight), never a site's update.
* :func:`run_secure_federation`: the rounds, with evaluation and checkpoints as in plain mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    Status,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    Key as SecAggKey,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from omegaconf import DictConfig

from pipeline.contracts.experiment import InvalidExperiment, experiment_from_yaml
from pipeline.contracts.layout import WorkDir
from pipeline.contracts.messages import (
    ARRAY_NAMES,
    ARRAYS,
    CONFIG,
    CONFIG_KEY,
    LEGACY_FIT_ARRAYS,
    LEGACY_FIT_CONFIG,
    METRICS,
    NUM_EXAMPLES,
    ROUND_KEY,
    SITE,
    SITE_NAME,
    STAMP,
)
from pipeline.federation.allocator import keep_large_blocks
from pipeline.federation.grids import DelegatingGrid
from pipeline.federation.releases import MASKING_NEIGHBOURS, ReleaseStore
from pipeline.federation.site_gate import received_experiment
from pipeline.federation.strategy import RecordingFedAvg, TooFewSites
from pipeline.privacy.secagg import MODULUS_RANGE, SecAggSettings, num_sites

log = logging.getLogger("fedrad.federation")

Checkpointer = Callable[[int, ArrayRecord], None]


# --- site side -------------------------------------------------------------------------


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Run Flower's ``secaggplus_mod`` for SecAgg+ training messages; pass others through."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    keep_large_blocks()  # the masking's model-sized temporaries, see pipeline.federation.allocator
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(SecAggKey.STAGE)
    if stage == Stage.SETUP:
        _check_protocol(msg, ctxt)
    elif stage == Stage.UNMASK:
        _check_unmasking(msg, ctxt)

    def train_handler(fit_msg: Message, fit_ctxt: Context) -> Message:
        fit_msg.content = _training_content(fit_msg.content)
        token = MASKING_NEIGHBOURS.set(_neighbours(fit_ctxt))
        try:
            reply = call_next(fit_msg, fit_ctxt)
        finally:
            MASKING_NEIGHBOURS.reset(token)
        if not reply.has_error():
            reply.content = _fit_result(reply.content, fit_msg.content)
        return reply

    return secaggplus_mod(msg, ctxt, train_handler)


def _neighbours(ctxt: Context) -> list[int]:
    """The sites whose keys this site received in the share-keys stage (it masks against them)."""
    state: Mapping[str, object] = ctxt.state.config_records.get(RECORD_KEY_STATE) or {}
    return sorted(int(node) for node in cast(list[int], state.get("public_keys_dict:K", [])))


def _check_protocol(msg: Message, ctxt: Context) -> None:
    """Refuse a SecAgg+ setup whose parameters are not the approved job's: a coordinator that
    lowers the reconstruction threshold needs fewer deceived sites to unmask one."""
    received = received_experiment(msg, ctxt)
    settings = SecAggSettings.from_config(received.cfg.federation, num_sites(received.cfg))
    expected = {
        SecAggKey.SHARE_NUMBER: settings.num_shares,
        SecAggKey.THRESHOLD: settings.reconstruction_threshold,
        SecAggKey.CLIPPING_RANGE: settings.clipping_range,
        SecAggKey.TARGET_RANGE: settings.quantization_range,
        SecAggKey.MOD_RANGE: MODULUS_RANGE,
        SecAggKey.MAX_WEIGHT: settings.max_weight,
    }
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    wrong = [
        f"{key}={configs.get(key)!r} (the job's: {value!r})"
        for key, value in expected.items()
        if configs.get(key) != value
    ]
    sampled = int(cast(int, configs.get(SecAggKey.SAMPLE_NUMBER, 0)))
    if sampled < settings.reconstruction_threshold:
        wrong.append(f"{SecAggKey.SAMPLE_NUMBER}={sampled} below the threshold")
    if wrong:
        raise InvalidExperiment(
            "secure aggregation set up with parameters other than the approved "
            f"job's: {'; '.join(wrong)}: refused"
        )


def _check_unmasking(msg: Message, ctxt: Context) -> None:
    """Refuse to unmask a round this site released before with other survivors or dropouts."""
    received = received_experiment(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    ReleaseStore(WorkDir.of_cache(received.cache_dir)).unmasking(
        received.run_id,
        received.server_round,
        [int(n) for n in cast(list[int], configs[SecAggKey.ACTIVE_NODE_ID_LIST])],
        [int(n) for n in cast(list[int], configs[SecAggKey.DEAD_NODE_ID_LIST])],
    )


def _training_content(content: RecordDict) -> RecordDict:
    """The ordinary ``arrays`` + ``config`` content of a legacy ``fitins`` message."""
    config = dict(content.config_records[LEGACY_FIT_CONFIG])
    names = cast(list[str], config.pop(ARRAY_NAMES))
    legacy = content.array_records[LEGACY_FIT_ARRAYS]
    arrays = {name: Array(bytes_to_ndarray(array.data)) for name, array in zip(names, legacy.values())}
    return RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: ConfigRecord(config)})


def _fit_result(reply: RecordDict, training: RecordDict) -> RecordDict:
    """The legacy fit result that ``secaggplus_mod`` masks, from the handler's reply."""
    metrics = cast(dict[str, Scalar], dict(reply[METRICS]))  # scalars (pipeline.training.loop.train)
    num_examples = int(metrics[NUM_EXAMPLES])
    # float64: Flower quantises in the arrays' own precision, and float32 cannot hold the
    # quantisation range's integers exactly (it would multiply the error by ~max_weight / n).
    ndarrays = [array.numpy().astype(np.float64) for array in cast(ArrayRecord, reply[ARRAYS]).values()]
    cfg = experiment_from_yaml(str(training[CONFIG][CONFIG_KEY]))
    settings = SecAggSettings.from_config(cfg.federation, num_sites(cfg))
    settings.check_site_update(num_examples, max(float(np.abs(a).max()) for a in ndarrays))
    if SITE in reply:  # the site's name travels beside its metrics in the legacy layout
        metrics[SITE] = str(cast(ConfigRecord, reply[SITE])[SITE_NAME])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ndarrays), num_examples, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# --- coordinator side ------------------------------------------------------------------


class SecureFitStrategy(LegacyFedAvg):
    """The legacy strategy the SecAgg+ workflow drives.

    It sends the global parameters with the experiment config, and receives only the
    unmasked weighted average: Flower's workflow sets every result's parameters to it. The
    recorder's server optimiser turns that average into the next global model.
    """

    def __init__(
        self,
        recorder: RecordingFedAvg,
        initial: dict[str, np.ndarray],
        train_config: dict[str, str],
        checkpointer: Checkpointer,
    ) -> None:
        self.names = list(initial)
        self.dtypes = [array.dtype for array in initial.values()]
        initial_parameters = ndarrays_to_parameters(list(initial.values()))
        super().__init__(
            fraction_fit=recorder.fraction_train,
            fraction_evaluate=0.0,  # evaluation runs in the ordinary message layout
            min_fit_clients=recorder.min_train_nodes,
            min_available_clients=recorder.min_available_nodes,
            initial_parameters=initial_parameters,
            # Flower annotates a config as scalars; it turns into a ConfigRecord, which holds lists too.
            on_fit_config_fn=lambda server_round: cast(
                dict[str, Scalar],
                {
                    **train_config,
                    ROUND_KEY: recorder.run_round(server_round),
                    ARRAY_NAMES: self.names,
                },
            ),
        )
        self.recorder = recorder
        self.checkpointer = checkpointer
        self.aggregated_round = 0
        self.sent: Parameters = initial_parameters

    def arrays(self, parameters: Parameters) -> ArrayRecord:
        """Named arrays (with the model's dtypes) from legacy, unnamed parameters."""
        ndarrays = parameters_to_ndarrays(parameters)
        return ArrayRecord({n: Array(_cast(a, t)) for n, a, t in zip(self.names, ndarrays, self.dtypes)})

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict]:
        names = self.recorder.names
        for proxy, res in results:
            names.reported(proxy.node_id, res.metrics.get(SITE))
        per_site = {
            names(proxy.node_id): {k: float(v) for k, v in res.metrics.items() if k != SITE}
            for proxy, res in results
        }
        self.recorder.record_train(
            server_round,
            per_site,
            self.recorder.aggregate_site_metrics(per_site),
            [str(failure) for failure in failures],
        )
        average: NDArrays = parameters_to_ndarrays(results[0][1].parameters)
        self.aggregated_round = server_round
        averaged = self.arrays(ndarrays_to_parameters([_cast(a, t) for a, t in zip(average, self.dtypes)]))
        stepped = self.recorder.server_optimizer.step(
            self.recorder.run_round(server_round), self.arrays(self.sent), averaged
        )
        return ndarrays_to_parameters([stepped[n].numpy() for n in self.names]), {}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        """Keep the global model sent this round (the server optimiser steps from it)."""
        self.sent = parameters
        return super().configure_fit(server_round, parameters, client_manager)

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """Checkpoint the global model after a round that released an aggregate."""
        if server_round and server_round == self.aggregated_round:
            self.checkpointer(server_round, self.arrays(parameters))
        return None


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The unmasked float64 average in the model's dtype (integers, e.g. batch counts, rounded)."""
    return (np.rint(array) if np.issubdtype(dtype, np.integer) else array).astype(dtype)


class ExperimentStampingGrid(DelegatingGrid):
    """A grid that adds the experiment record to every message it sends, delegating the rest."""

    def __init__(self, grid: Grid, stamp: ConfigRecord) -> None:
        super().__init__(grid)
        self.stamp = stamp

    def _stamped(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            message.content.config_records[STAMP] = ConfigRecord(dict(self.stamp))
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._stamped(messages))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(self._stamped(messages), timeout=timeout)


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that says why a round halted and records it; every stage's
    messages carry the experiment (:class:`ExperimentStampingGrid`)."""

    def __init__(
        self, settings: SecAggSettings, recorder: RecordingFedAvg, shared_config: dict[str, str]
    ) -> None:
        super().__init__(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            timeout=settings.timeout_s,
        )
        self.recorder = recorder
        self.shared_config = shared_config

    def __call__(self, grid: Grid, context: Context) -> None:
        context = cast(LegacyContext, context)
        server_round = int(cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        self.recorder.check_stop()
        stamp: dict[str, ConfigRecordValues] = {
            **self.shared_config,
            ROUND_KEY: self.recorder.run_round(server_round),
        }
        grid = ExperimentStampingGrid(grid, ConfigRecord(stamp))
        self.recorder.names.refresh(grid)
        state = WorkflowState()
        stages = {
            "setup": self.setup_stage,
            "share keys": self.share_keys_stage,
            "collect masked vectors": self.collect_masked_vectors_stage,
            "unmask": self.unmask_stage,
        }
        for name, stage in stages.items():
            if not stage(grid, context, state):
                self.recorder.record_failed_round(server_round, _halt_reason(name, state))
                self._stop_if_budgets_spent(server_round, state)
                return

    def _stop_if_budgets_spent(self, server_round: int, state: WorkflowState) -> None:
        """Sites out of privacy budget never train again: stop when too few are left."""
        # Imported here: the ClientApp imports this module, and Opacus with the ledger is slow.
        from pipeline.governance.budget import PrivacyBudgetExhausted

        refused = {str(f) for f in state.failures if PrivacyBudgetExhausted.__name__ in str(f)}
        able = len(state.sampled_node_ids) - len(refused)
        if able < self.recorder.min_train_nodes:
            raise TooFewSites(
                f"{len(refused)} sites have spent their privacy budget in round "
                f"{self.recorder.run_round(server_round)}; "
                f"{able} remain but federation.min_sites={self.recorder.min_train_nodes}: "
                "the federation stops"
            )


def _halt_reason(stage: str, state: WorkflowState) -> str:
    # Flower records a stage's failed replies once per pass over them: deduplicate.
    failures = "; ".join(dict.fromkeys(map(str, state.failures))) or "none reported"
    return (
        f"secure aggregation halted at stage '{stage}': {len(state.active_node_ids)} of "
        f"{len(state.sampled_node_ids)} sites still active, reconstruction threshold "
        f"{state.threshold}; the global model is unchanged (site failures: {failures})"
    )


def evaluation_workflow(
    recorder: RecordingFedAvg, strategy: SecureFitStrategy, config: ConfigRecord, timeout: float
) -> Callable[[Grid, Context], None]:
    """The evaluation step of each round, in the ordinary message layout of plain FedAvg."""

    def evaluate(grid: Grid, context: Context) -> None:
        context = cast(LegacyContext, context)
        server_round = int(cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        parameters = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        messages = recorder.configure_evaluate(server_round, strategy.arrays(parameters), config, grid)
        recorder.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))

    return evaluate


def run_secure_federation(
    grid: Grid,
    context: Context,
    cfg: DictConfig,
    recorder: RecordingFedAvg,
    initial: dict[str, np.ndarray],
    shared_config: dict[str, str],
    checkpointer: Checkpointer,
) -> None:
    """The rounds of ``federation.num_rounds`` still to run (all but the recorder's
    completed ones), FedAvg with SecAgg+ as the training step."""
    fed = cfg.federation
    settings = SecAggSettings.from_config(fed, num_sites(cfg))
    log.info(
        "secure aggregation (SecAgg+): %d shares, reconstruction threshold %d, clipping range "
        "%g, quantisation range %d, max weight %g",
        settings.num_shares,
        settings.reconstruction_threshold,
        settings.clipping_range,
        settings.quantization_range,
        settings.max_weight,
    )
    keep_large_blocks()  # unmasking makes model-sized temporaries too
    strategy = SecureFitStrategy(recorder, initial, shared_config, checkpointer)
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=int(fed.num_rounds) - recorder.completed_rounds),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=ReportingSecAggPlusWorkflow(settings, recorder, shared_config),
        evaluate_workflow=evaluation_workflow(
            recorder,
            strategy,
            ConfigRecord(cast(dict[str, ConfigRecordValues], shared_config)),
            float(fed.round_timeout_s),
        ),
    )
    workflow(grid, legacy)

"""A warm site: the site's own ClientApp runs every message inside the long-lived site process.

Flower 1.41's SuperNode, by default, has its SuperExec start a fresh ``flwr-clientapp``
process for every message, which pays Python's start-up, the import of the training stack and
(on a GPU) a new CUDA context each time, and imports whatever ClientApp the run's app bundle
names. Started with ``--isolation process``, the SuperNode starts no executor: it queues each
message as a *task* on its Runtime API (loopback only) until an executor acquires it. The site
process is that executor (:class:`WarmRuntime`): one thread acquires the site's tasks one at a
time and runs each with fedrad's installed ClientApp (:data:`pipeline.federation.client_app.app`,
the same approval gate, SecAgg+ masking, ledger, revocation and replay store as before), so
the training stack and any CUDA context stay loaded for the life of the site.

What the coordinator cannot do through this path: make the site run code. The app bundle a
run carries names a ClientApp; this runtime never reads it. Acquiring a task is signed with a
secret that only the site's user can read (Flower's SuperExec authentication, the secret in the
site's private folder), so no other local user can take the site's tasks or answer in its name.
Each task runs in a fresh :mod:`contextvars` context, so nothing set while one message ran
(such as the SecAgg+ masking neighbours) is seen by the next.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import os
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from pipeline.contracts.packing import HeldArrays, PackingError, holding, packed, unpacked
from pipeline.contracts.transfer import PROMPT_PULLS
from pipeline.governance.budget import PrivacyBudgetExhausted

log = logging.getLogger("fedrad.deployment")

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the Runtime API call signed with the secret
POLL_S = 0.2  # how often an idle site asks its SuperNode for a task (a loopback call)
# Transient failures of a call on loopback (a busy SuperNode) are retried for this long.
RETRY_FOR_S = 60.0
# What the site logs as each message starts (tests and operators look for it).
TASK_STARTED = "message received"
TASK_ANSWERED = "message answered"
HELD_ALREADY = "; its arrays held already"  # a message that referred to arrays the site held
# What the site's own policy refuses (approval, allow-list, replay, budget) and a message whose
# packing does not hold: a warning, no traceback.
REFUSALS = (PermissionError, PrivacyBudgetExhausted, PackingError)


def write_secret(path: Path) -> Path:
    """A fresh random secret for signing task requests, readable only by the site's user."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    tmp.replace(path)
    return path


def _transient(exc: Exception) -> bool:
    """A failure worth trying again: the connection, or a SuperNode answering 502/503/504."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (502, 503, 504)
    return isinstance(exc, httpx.TransportError)


def _retry() -> RetryInvoker:
    """Retries for one task's calls: transient failures only, for :data:`RETRY_FOR_S` at most.

    (Flower's own invoker interrupts the whole process on a 401, which would stop the site.)
    """
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=httpx.HTTPError,
        max_tries=None,
        max_time=RETRY_FOR_S,
        should_giveup=lambda exc: not _transient(exc),
    )


def _heartbeat(client: RuntimeHttpClient) -> bool:
    """One task heartbeat; False (tried again sooner) when the SuperNode did not take it."""
    try:
        return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
    except httpx.HTTPError:
        return False


def _since(iso_time: str) -> float:
    """Seconds since the ISO 8601 time ``iso_time`` (0 when it does not parse)."""
    try:
        return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(iso_time)).total_seconds())
    except (TypeError, ValueError):
        return 0.0


def pull_message(client: RuntimeHttpClient) -> tuple[Message, Context]:
    """The task's message as sent (packed: :mod:`pipeline.contracts.packing`) and its context
    from the SuperNode (what Flower's ``pull_task_input`` does, less the app bundle, which is
    never used, and asking again sooner for the parts still arriving:
    :mod:`pipeline.contracts.transfer`)."""
    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task.task_id
    TaskIdentity.run_id = task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without a message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        **PROMPT_PULLS,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its id
    return message, context


def run_task(address: str, token: str, app: ClientApp, held: HeldArrays, queued_s: float = 0.0) -> None:
    """Run the task ``token`` names with ``app``: pull its message and context from the
    SuperNode, handle it, push the reply (saying which packed arrays the site holds, ``held``)
    and the updated context.

    Logs, once answered, where the message's time went: ``queued_s`` waiting for the site to
    take it, arriving (the SuperNode still downloading it from the coordinator, then the
    hand-over), handling it (the ClientApp), and handing the reply back. Queued and handing
    back are this path's fixed cost per message.
    """
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback, inside the site's machine
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor("flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=_retry(),
    )
    heartbeat = HeartbeatSender(lambda: _heartbeat(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "the site's ClientApp failed"
    clock = [time.monotonic()]  # taken, arrived, handled, handed back
    try:
        message, context = pull_message(client)
        clock.append(time.monotonic())
        referred = held.referred
        received, state = unpacked(message, held), context  # a packing refused gets an error reply
        log.info(
            "%s %s (run %d%s)",
            message.metadata.message_type,
            TASK_STARTED,
            message.metadata.run_id,
            HELD_ALREADY if held.referred > referred else "",
        )
        reply = contextvars.Context().run(lambda: app(message=received, context=state))
        if not reply.has_error():  # handled: the run's next message may refer to its arrays
            held.accept()
        clock.append(time.monotonic())
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # one bad message never stops the site: it gets an error reply
        kind = message.metadata.message_type if message is not None else "task"
        if isinstance(exc, REFUSALS):  # the site's policy said no: one line with the reason
            log.warning("the site refused a %s message: %s", kind, exc)
        else:
            log.error("the site's ClientApp failed on a %s message: %s", kind, exc, exc_info=exc)
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
            reply = Message(error, reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, holding(packed(reply), held), context)
            push_task_output(client, context, status, details)
        except httpx.HTTPError as exc:
            log.warning("the site could not hand its reply to its SuperNode: %s", exc)
            status = SubStatus.FAILED
        clock.append(time.monotonic())
        if status == SubStatus.COMPLETED and message is not None:
            arriving, handling, handing_back = (later - earlier for earlier, later in zip(clock, clock[1:]))
            log.info(
                "%s %s: %.2f s queued, %.2f s arriving, %.2f s handling it, %.2f s handing it back",
                message.metadata.message_type,
                TASK_ANSWERED,
                queued_s,
                arriving,
                handling,
                handing_back,
            )
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        gc.collect()  # the message's arrays go now, not at some later round


class WarmRuntime:
    """The site's executor: a daemon thread that runs the SuperNode's tasks with ``app``,
    across SuperNode restarts, until :meth:`stop`."""

    def __init__(self, address: str, secret_file: Path, app: ClientApp) -> None:
        self.address = address
        self.app = app
        self.held = HeldArrays()  # per run, the packed arrays of the last message handled
        self._refusal = ""  # the last refusal logged (each new one is logged once)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fedrad-clientapp", daemon=True)
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor("SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret_file.read_bytes(), protected_methods={ACQUIRE}
                ),
            ],
        )

    def start(self) -> WarmRuntime:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop acquiring tasks; a task already running finishes (up to ``timeout``)."""
        self._stop.set()
        self._thread.join(timeout)
        self._client.close()

    def _acquire(self) -> tuple[str, float] | None:
        """A task's token and how long it was queued, or None when the SuperNode has none (or is
        not up yet)."""
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        try:
            response = self._client.AcquireTask(request)
        except httpx.TransportError:
            return None  # the SuperNode is (re)starting
        except httpx.HTTPStatusError as exc:
            refusal = f"{exc.response.status_code} {exc.response.reason_phrase}"
            if refusal != self._refusal:
                log.warning(
                    "the site's SuperNode refused its request for a task: %s (%s)", refusal, exc.request.url
                )
            self._refusal = refusal
            return None
        self._refusal = ""
        if not (response.HasField("task") and response.token):
            return None
        return response.token, _since(response.task.pending_at)

    def _serve(self) -> None:
        while not self._stop.is_set():
            task = self._acquire()
            if task is None:
                self._stop.wait(POLL_S)
                continue
            token, queued_s = task
            try:
                run_task(self.address, token, self.app, self.held, queued_s)
            except Exception as exc:  # the runtime outlives any task: the next one is taken
                log.error("the site could not run a task: %s", exc, exc_info=exc)

"""fedrad's entry points around Flower's SuperNode and SuperLink change only what they say:
the SuperNode's waits (pipeline.deployment.flower_supernode) and where the SuperLink keeps
messages' objects (pipeline.deployment.flower_superlink)."""

from __future__ import annotations

import inspect
import sys

import pytest
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.superlink import config_loader
from flwr.supernode import start_client_internal

from pipeline.contracts.layout import SitePaths
from pipeline.deployment import flower_superlink, flower_supernode, processes
from pipeline.deployment.coordinator import superlink_command
from pipeline.deployment.site import node_config, supernode_command
from tests.conftest import compose_config


def test_the_supernode_asks_for_messages_every_poll_s_and_waits_briefly_for_replies(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(flower_supernode.time, "sleep", waits.append)
    clock = flower_supernode._PromptClock(0.25)
    clock.sleep(3)  # Flower's wait after asking the SuperLink for nothing
    clock.sleep(0.5)  # its step while waiting for the site's reply
    clock.sleep(0.01)
    assert waits == [0.25, flower_supernode.REPLY_WAIT_S, 0.01]
    assert clock.monotonic is flower_supernode.time.monotonic  # everything else is time itself


@pytest.mark.parametrize("argv", [[], ["--superlink", "x:1"], ["--poll-s", "0"], ["--poll-s", "4"]])
def test_the_supernode_entry_point_refuses_a_poll_it_cannot_honour(argv, monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)  # restored after
    with pytest.raises(SystemExit, match="poll-s"):
        flower_supernode.main(argv)


def test_a_site_and_the_coordinator_start_flowers_processes_through_these_entry_points(tmp_path):
    cfg = compose_config("+site=demo_site1", "deployment.insecure=true", f"deployment.state_dir={tmp_path}")
    site = SitePaths.under(tmp_path, "site1")
    command = supernode_command(cfg.deployment, node_config(site, cfg), tmp_path / "secret")
    assert command[:4] == [sys.executable, "-m", flower_supernode.__name__, "--poll-s"]
    assert float(command[4]) == cfg.deployment.poll_s == 0.25
    assert superlink_command(cfg.deployment)[:3] == [sys.executable, "-m", flower_superlink.__name__]
    # a command killed before it could stop them: its Flower processes are still found by name
    for started in (command, superlink_command(cfg.deployment)):
        assert processes._is_flower(type("Process", (), {"cmdline": lambda self, c=started: c})())


def test_the_superlink_keeps_objects_in_memory_whatever_its_database():
    store = flower_superlink._objects_in_memory("/var/lib/fedrad/superlink.db").store()
    assert isinstance(store, InMemoryObjectStore)


def test_the_entry_points_change_what_flowers_code_calls(monkeypatch):
    """What each entry point replaces is what Flower 1.41 calls (a Flower upgrade that stops
    calling it fails here, not silently in a slower deployment)."""
    for module, name in [
        (start_client_internal, "time"),
        (start_client_internal, "pull_objects"),
        (config_loader, "ObjectStoreFactory"),
    ]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(sys, "argv", sys.argv)
    started: list[list[str]] = []
    monkeypatch.setattr(flower_supernode, "flower_supernode", lambda: started.append(sys.argv))
    monkeypatch.setattr(flower_superlink, "flower_superlink", lambda: started.append(sys.argv))
    flower_supernode.main(["--poll-s", "0.25", "--superlink", "coordinator:9092"])
    flower_superlink.main(["--database", "state.db"])
    assert started == [
        ["flower-supernode", "--superlink", "coordinator:9092"],
        ["flower-superlink", "--database", "state.db"],
    ]
    assert isinstance(start_client_internal.time, flower_supernode._PromptClock)
    assert start_client_internal.pull_objects is flower_supernode._prompt_pull_objects
    loop = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in loop and "pull_objects(" in loop and "time.sleep(0.5)" in loop
    factories = inspect.getsource(config_loader.get_objectstore_linkstate_factories)
    assert "ObjectStoreFactory(database)" in factories
    assert isinstance(config_loader.ObjectStoreFactory("state.db").store(), InMemoryObjectStore)

"""The suite's own xdist ordering (tests/scheduling.py): longest work first, durations recorded and stored."""

import json
from types import SimpleNamespace

from tests import scheduling


def item(node_id: str):
    return SimpleNamespace(nodeid=node_id)


def test_units_run_longest_first_and_keep_their_inner_order():
    items = [item("a.py::t1"), item("a.py::t2"), item("b.py::lone"), item("c.py::t1@c"), item("c.py::t2"),
             item("d.py::unknown")]
    groups = {"a.py::t1": "a", "a.py::t2": "a", "c.py::t1@c": "c", "c.py::t2": "c"}
    durations = {"a.py::t1": 3.0, "a.py::t2": 4.0, "b.py::lone": 20.0, "c.py::t1": 9.0, "c.py::t2": 1.0}
    ordered = scheduling.costliest_first(items, lambda i: groups.get(i.nodeid), durations)
    # b alone (20 s) > c (9 + 1, the @c suffix stripped) > a (3 + 4) > d (unknown: UNKNOWN_SECONDS)
    assert [i.nodeid for i in ordered] == ["b.py::lone", "c.py::t1@c", "c.py::t2", "a.py::t1", "a.py::t2",
                                           "d.py::unknown"]


def test_equal_costs_keep_the_collection_order():
    items = [item(f"m.py::t{n}") for n in range(5)]
    assert scheduling.costliest_first(items, lambda i: None, {}) == items


def test_group_suffix_is_stripped_but_not_a_parameter_with_an_at_sign():
    assert scheduling.plain_node_id("tests/x.py::test_a[p]@tests.x") == "tests/x.py::test_a[p]"
    assert scheduling.plain_node_id("tests/x.py::test_a") == "tests/x.py::test_a"
    assert scheduling.plain_node_id("tests/x@y.py::C::test_a") == "tests/x@y.py::C::test_a"
    assert scheduling.plain_node_id("tests/x.py::test_a[u@host]") == "tests/x.py::test_a[u@host]"
    assert scheduling.plain_node_id("tests/x.py::test_a[u@host]@tests.x") == "tests/x.py::test_a[u@host]"


def test_phases_add_up_and_are_stored_atomically_by_the_controller_only(tmp_path, monkeypatch):
    target = tmp_path / "durations.json"
    monkeypatch.setenv(scheduling.STORE_ENV, str(target))
    monkeypatch.setattr(scheduling, "_measured", {})
    for phase_seconds in (0.25, 1.5, 0.25):  # set-up, call, tear-down
        scheduling.record(SimpleNamespace(nodeid="t.py::a@grp", duration=phase_seconds))
    scheduling.store(SimpleNamespace(workerinput={}))  # an xdist worker: the controller writes
    assert not target.exists()
    scheduling.store(SimpleNamespace())
    assert json.loads(target.read_text()) == {"t.py::a": 2.0}
    assert not list(tmp_path.glob("*.partial"))
    assert scheduling.load_durations(target) == {"t.py::a": 2.0}
    assert scheduling.load_durations(tmp_path / "missing.json") == {}

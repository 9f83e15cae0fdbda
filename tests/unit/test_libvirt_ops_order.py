"""libvirt snapshots and checkpoints are listed parents first, even when created within one second."""

from __future__ import annotations

from vmsnap.vm.libvirt.snapshots import _oldest_first


def _xml(name: str, parent: str | None, created: int) -> str:
    link = f"<parent><name>{parent}</name></parent>" if parent else ""
    return (
        f"<domaincheckpoint><name>{name}</name>{link}"
        f"<creationTime>{created}</creationTime></domaincheckpoint>"
    )


def test_parents_come_before_children_when_creation_times_tie() -> None:
    xmls = [_xml("c2", "c1", 100), _xml("c3", "c2", 100), _xml("c1", None, 100)]
    assert _oldest_first(xmls) == ["c1", "c2", "c3"]


def test_unrelated_ones_sort_by_creation_time_then_name() -> None:
    xmls = [_xml("b", None, 7), _xml("z", None, 5), _xml("a", None, 7)]
    assert _oldest_first(xmls) == ["z", "a", "b"]


def test_a_parent_that_was_deleted_does_not_break_the_order() -> None:
    assert _oldest_first([_xml("c3", "c2", 9), _xml("c2", "gone", 9)]) == ["c2", "c3"]

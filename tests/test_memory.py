"""Free memory as a process in a container sees it: the cgroup's limit caps the machine's."""

from __future__ import annotations

from smfsr import memory

GiB = 2**30


def cgroup(folder, version: int, limit: str, usage: int, inactive: int):
    names = memory.CGROUP_FILES[version - 1]
    files = tuple(str(folder / n.rsplit("/", 1)[1]) for n in names[:3]) + (names[3],)
    (folder / names[0].rsplit("/", 1)[1]).write_text(limit + "\n")
    (folder / names[1].rsplit("/", 1)[1]).write_text(f"{usage}\n")
    (folder / names[2].rsplit("/", 1)[1]).write_text(f"anon {usage - inactive}\n{names[3]} {inactive}\n")
    return (files,)


def test_the_cgroup_limit_caps_free_memory(tmp_path, monkeypatch):
    v2 = cgroup(tmp_path, 2, str(8 * GiB), 3 * GiB, 1 * GiB)
    assert memory.cgroup_headroom(v2) == 6 * GiB  # 8 - (3 - 1 reclaimable)
    monkeypatch.setattr(memory, "CGROUP_FILES", v2)
    assert memory.free_host_bytes() <= 6 * GiB
    (tmp_path / "v1").mkdir()
    v1 = cgroup(tmp_path / "v1", 1, str(4 * GiB), 1 * GiB, 0)
    assert memory.cgroup_headroom(v1) == 3 * GiB


def test_no_limit_leaves_the_machines_free_memory(tmp_path, monkeypatch):
    unlimited = cgroup(tmp_path, 2, "max", GiB, 0)
    assert memory.cgroup_headroom(unlimited) is None
    (tmp_path / "v1").mkdir()
    assert memory.cgroup_headroom(cgroup(tmp_path / "v1", 1, "9223372036854771712", GiB, 0)) is None  # v1's "none"
    assert memory.cgroup_headroom(((str(tmp_path / "absent"), str(tmp_path / "absent"), "", "x"),)) is None
    monkeypatch.setattr(memory, "CGROUP_FILES", unlimited)
    free = memory.free_host_bytes()
    assert free is not None and free > 0


def test_a_bundles_rebuilt_position_table_is_counted(tmp_path):
    """Bundles leave out the standard sin-cos table; the load rebuilds it in the network's dtype."""
    from smfsr.checkpoint.bundle import save_bundle
    from tests.helpers import tiny_bundle

    bundle = tiny_bundle()
    path = save_bundle(tmp_path / "b.safetensors", bundle)
    table = bundle.transformer.pos_embed.pos_embed
    counted = [t for t in memory.stored_tensors(path) if t[1] == table.numel()]
    assert counted == [(True, table.numel(), "F32")]

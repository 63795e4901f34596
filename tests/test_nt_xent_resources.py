"""The static resources of the CUDA kernels (bench/resource_table.py writes the table in
bench/RESULTS.md from nvcc -Xptxas -v): the table is current (a hash of csrc/'s kernel sources),
no hot kernel spills or holds fewer resident blocks than its __launch_bounds__ promise, and the
occupancy arithmetic is right.
"""

from __future__ import annotations

import sys

from nt_xent_cases import ROOT


def _resource_rows() -> tuple[str, list[dict]]:
    sys.path.insert(0, str(ROOT / "bench"))
    import resource_table as rt

    text = (ROOT / "bench" / "RESULTS.md").read_text()
    assert rt.BEGIN in text and rt.END in text, "no resource table in bench/RESULTS.md"
    block = text.split(rt.BEGIN, 1)[1].split(rt.END, 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].startswith("`"):
            keys = ("regs", "spill_st", "spill_ld", "stack", "smem", "resident", "promise")
            rows.append(
                {"name": cells[0].strip("`"), "sm": int(cells[1]), "hot": cells[9] == "yes"}
                | dict(zip(keys, map(int, cells[2:9])))
            )
    return block, rows


def test_resource_table_is_current_and_hot_kernels_keep_their_promise():
    """The table was written from the current kernel sources (else: run
    python bench/resource_table.py), covers sm_80 and sm_90, and no hot kernel spills or holds
    fewer resident blocks per SM than its __launch_bounds__ promise."""
    sys.path.insert(0, str(ROOT / "bench"))
    import resource_table as rt

    block, rows = _resource_rows()
    assert f"`{rt.sources_hash()}`" in block, "stale table: run python bench/resource_table.py"
    hot = [r for r in rows if r["hot"]]
    assert {r["sm"] for r in hot} == {80, 90}
    assert any(r["name"].startswith("fwd_kernel<bf16") for r in hot)
    assert any(r["name"].startswith("tiled_fwd_chunk_kernel") for r in hot)
    bad = [
        f"{r['name']} sm_{r['sm']}: {r['spill_st']}/{r['spill_ld']} B spilled, "
        f"{r['resident']} resident < promise {r['promise']}"
        for r in hot
        if r["spill_st"] or r["spill_ld"] or r["resident"] < r["promise"]
    ]
    assert not bad, "\n".join(bad)


def test_resource_table_occupancy_rules():
    """The occupancy arithmetic against the figures of the review (sm_90, 128 threads)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import resource_table as rt

    assert rt.resident_blocks(168, 48640, 90) == 3  # register-bound (shared memory allows 4)
    assert rt.resident_blocks(255, 48640, 90) == 2
    assert rt.resident_blocks(128, 48640, 90) == 4  # shared-memory-bound
    assert rt.resident_blocks(128, 48640, 80) == 3  # 164 KiB on sm_80
    assert rt.resident_blocks(32, 0, 90) == 16  # thread-bound
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 12 bytes spill stores, 36 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 48640 bytes smem, 400 bytes cmem[0]\n"
    )
    (row,) = rt.parse_ptxas(log)
    assert (row["regs"], row["spill_st"], row["spill_ld"], row["smem"]) == (168, 12, 36, 48640)
    assert row["name"] == "foo"

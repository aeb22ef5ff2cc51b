"""Shared benchmark harness: a ratio table after pytest-benchmark's own.

Benchmarks may add `extra_info["peak_mb"]`, the memory a call adds, shown as a column.

Each benchmark names its implementation in `extra_info["impl"]`; the one marked
`extra_info["baseline"] = True` in a group is the denominator of that group's ratios.
"""


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    rows = [b for b in getattr(session, "benchmarks", []) if b]  # empty when disabled
    if not rows:
        return
    groups: dict[str, list] = {}
    for bench in rows:
        groups.setdefault(bench.group or bench.name, []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("oar-kernels ratios (median time; speedup = baseline / this)")
    write(f"{'group':<44} {'implementation':<20} {'median ms':>11} {'speedup':>9} {'peak MB':>9}")
    for group, benches in groups.items():
        base = next((b for b in benches if b.extra_info.get("baseline")), None)
        for bench in sorted(benches, key=lambda b: -b.stats.median):
            impl = bench.extra_info.get("impl", bench.name)
            ratio = f"{base.stats.median / bench.stats.median:8.1f}x" if base else "      n/a"
            peak = bench.extra_info.get("peak_mb")
            peak = f"{peak:9.1f}" if peak is not None else ""
            write(f"{group:<44} {impl:<20} {bench.stats.median * 1e3:11.3f} {ratio:>9} {peak}")
    write("")

"""Draws docs/benchmarks.png from the benchmark's results (docs/benchmarks.json).

usage: python3 scripts/bench_chart.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
fig, (drain, live) = plt.subplots(1, 2, figsize=(15, 5.2))

labels, ours, refs = [], [], []
for d in results["drain"]:
    mode = "\neffectively-once" if d.get("effectively_once") else ""
    broker = d["broker"].replace("librdkafka mock cluster", "mock").replace(" (", "\n(")
    labels.append(f'{broker}\n{d["rows_per_transaction"]}-row txns{mode}')
    ours.append(d["outboxd_events_per_s"])
    refs.append(d["reference_events_per_s"])
labels.append("polling relay\n(redis)")
ours.append(results["drain"][0]["outboxd_events_per_s"])
refs.append(results["polling_relay_events_per_s"])
x = range(len(labels))
drain.bar([i - 0.2 for i in x], ours, 0.4, label="outboxd")
drain.bar([i + 0.2 for i in x], refs, 0.4, label="reference (same run)")
drain.set_xticks(list(x), labels)
drain.tick_params(axis="x", labelsize=7)
drain.set_ylabel("events per second")
drain.set_title("Backlog drain: outboxd against pg_recvlogical\nand against a polling relay")
drain.legend()

styles = {"outboxd": "-", "pg_recvlogical": "--"}
for observer, style in styles.items():
    runs = [l for l in results["live"] if l.get("observer", "outboxd") == observer]
    if not runs:
        continue
    rates = [f'{l["rate"]}/s' for l in runs]
    name = "outboxd, to Redis" if observer == "outboxd" else "pg_recvlogical (reference)"
    for key, q in (("p50_ms", "p50"), ("p99_ms", "p99")):
        live.plot(rates, [l[key] for l in runs], marker="o", linestyle=style, label=f"{name} {q}")
live.axhline(25, color="grey", linestyle=":", linewidth=1, label="p99 target at 5,000/s")
live.set_yscale("log")
live.set_ylabel("milliseconds from commit")
live.set_title("Live latency at fixed commit rates (rounds pooled)")
live.legend(fontsize=7)

fig.suptitle(results["environment"], fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)

"""The benchmark report: benchmarks.md (tables, targets met or missed, machine) and benchmarks.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from macnat import bench, fuzz  # noqa: E402
from macnat.bench import datapath  # noqa: E402


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def write(results: dict, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    markdown = output / "benchmarks.md"
    plot = output / "benchmarks.png"
    draw(results, plot)
    kept = fuzz.carried_over(markdown.read_text()) if markdown.exists() else ""  # python -m macnat.fuzz's figures
    markdown.write_text(render(results, plot.name) + kept)
    return markdown


def render(r: dict, plot_name: str) -> str:
    plan, m, dp, labr, learn, run = r["plan"], r["machine"], r["datapath"], r["lab"], r["learning"], r["running"]
    out = [
        "# macnat benchmarks",
        "",
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, by `macnat bench{' --quick' if plan.quick else ''}`"
        f"{' (a smoke run: too short for conclusions)' if plan.quick else ''}. "
        "Every comparison is measured side by side in the same run.",
        "",
        f"![benchmarks]({plot_name})",
        "",
        "## 1. Per-packet datapath cost",
        "",
        f"BPF_PROG_TEST_RUN, {dp['repeat']:,} repetitions per measurement, {dp['rounds']} round(s); each round also "
        f"measures an empty TC program (median {dp['empty_ns']:.0f} ns/packet). Ratio: the median of the per-round "
        f"ratios to the empty program. Target: every fast path <= {bench.TARGET_FAST_PATH_RATIO:g}x.",
        "",
        "| path | fast path | ns/packet | x empty (min-max) | target |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for c in dp["paths"]:
        target = verdict(c.ratio <= bench.TARGET_FAST_PATH_RATIO) if c.fast else "(signalling)"
        out.append(f"| {c.name} | {'yes' if c.fast else 'no'} | {c.ns:.0f} | {c.ratio:.2f} "
                   f"({c.spread[0]:.2f}-{c.spread[1]:.2f}) | {target} |")
    out += [
        "",
        datapath.__doc__.split("\n\n", 1)[1].strip(),
        "The broadcast path's cost includes the bridge flooding the copy to its ports (done inside "
        "bpf_clone_redirect).",
        "",
        "## 2. Table scale",
        "",
        f"The fast paths with {', '.join(f'{n:,}' for n in datapath.TABLE_SIZES)} bindings loaded (half IPv4, half "
        f"IPv6). Target: {max(datapath.TABLE_SIZES):,} costs <= {bench.TARGET_TABLE_SCALE:g}x of "
        f"{min(datapath.TABLE_SIZES)}.",
        "",
        "| path | " + " | ".join(f"{n:,} (ns)" for n in datapath.TABLE_SIZES) + " | largest / smallest | target |",
        "| --- | " + " | ".join("---:" for _ in datapath.TABLE_SIZES) + " | ---: | --- |",
    ]
    small, large = min(datapath.TABLE_SIZES), max(datapath.TABLE_SIZES)
    for name in dp["scale"][small]:
        ratio = dp["scale"][large][name] / dp["scale"][small][name]
        out.append(f"| {name} | " + " | ".join(f"{dp['scale'][n][name]:.0f}" for n in datapath.TABLE_SIZES)
                   + f" | {ratio:.2f} | {verdict(ratio <= bench.TARGET_TABLE_SCALE)} |")
    a = labr["a"]
    out += [
        "",
        "## 3. Throughput and latency in the lab",
        "",
        f"vm1 and the LAN host, through the emulated access point; {plan.rounds} round(s), each measuring every "
        f"setup in a shuffled order; iperf3 for {plan.seconds:g} s per measurement (TCP; UDP with 64-byte "
        f"payloads sent as fast as possible), {plan.pings} pings 2 ms apart. Each value: the median over rounds; "
        "x (a): the median of the per-round ratios to (a), with their range. The VM is always the iperf3 client "
        "(LAN -> VM is iperf3 -R), so NAT can be measured too. br_netfilter's iptables calls are off on the "
        f"laptop for every setup. Target: macnat >= {bench.TARGET_THROUGHPUT_RATIO:g}x of (a), and ahead of "
        "(c), (d) and (e).",
        "",
        "| setup | TCP VM->LAN Gbit/s | TCP LAN->VM Gbit/s | UDP VM->LAN kpps | UDP LAN->VM kpps | RTT p50 / p99 ms | "
        "LAN reaches VM |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def cell(row: dict, metric: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        value = fmt.format(row[metric]["median"] / scale)
        if row is a:
            return value
        lo, hi = row[metric]["spread"]
        return f"{value} ({row[metric]['ratio']:.2f}x, {lo:.2f}-{hi:.2f})"

    for key, row in labr.items():
        out.append(f"| ({key}) {row['title']} | {cell(row, 'tcp_up')} | {cell(row, 'tcp_down')} | "
                   f"{cell(row, 'udp_up', 1e3, '{:.0f}')} | {cell(row, 'udp_down', 1e3, '{:.0f}')} | "
                   f"{row['rtt_p50']['median']:.3f} / {row['rtt_p99']['median']:.3f} | "
                   f"{'yes' if row['lan_reaches_vm'] else 'no'} |")
    b = labr["b"]
    throughput = ("tcp_up", "tcp_down", "udp_up", "udp_down")
    worst = min(b[k]["ratio"] for k in throughput)
    ahead = all(b[k]["median"] >= labr[o][k]["median"] for o in "cde" for k in throughput)
    out += [
        "",
        "UDP loss (median, VM->LAN / LAN->VM): " + "; ".join(
            f"({k}) {row['udp_up_loss']:.1f}% / {row['udp_down_loss']:.1f}%" for k, row in labr.items()) + ".",
        "",
        f"- macnat's lowest throughput ratio to (a): {worst:.3f}x: {verdict(worst >= bench.TARGET_THROUGHPUT_RATIO)} "
        f"(target >= {bench.TARGET_THROUGHPUT_RATIO:g}x).",
        f"- macnat ahead of (c), (d) and (e) on every throughput metric (medians): {verdict(ahead)}.",
        "- (e) hides the VMs: nothing on the LAN can reach them.",
        "",
    ]
    if r.get("profile"):
        out += [
            "Where the time goes: `perf record -a -g` during one TCP VM -> LAN transfer under (a) and under (b), "
            "whole machine, self time by symbol (idle included). macnat's programs appear as JIT-compiled "
            "`bpf_prog_*` symbols.",
            "",
            "| (a) plain bridging | % | (b) macnat | % |",
            "| --- | ---: | --- | ---: |",
        ]
        pa, pb = r["profile"]["a"], r["profile"]["b"]
        for (sa, na), (sb, nb) in zip(pa["top"], pb["top"], strict=False):  # as many rows as the shorter
            out.append(f"| `{na}` | {sa:.1f} | `{nb}` | {sb:.1f} |")
        out += [
            "",
            f"In this transfer (a) moved {pa['gbits']:.2f} Gbit/s and (b) {pb['gbits']:.2f} Gbit/s; macnat's BPF "
            f"programs took {pb['bpf_percent']:.2f}% of the samples"
            + (": the translation itself is a small share of the work, and a throughput difference between "
               "the setups comes from elsewhere (compare the top symbols; on a 2-core machine, largely from "
               "where the scheduler puts the iperf3 processes and softirqs, which is why only paired, "
               "interleaved rounds are compared)." if pb["bpf_percent"] < 2 else "."),
            "",
        ]
    out += [
        "## 4. Learning",
        "",
        f"{learn['addresses']} addresses new to macnat: the VM sends exactly one echo request to the LAN host right "
        "after taking the address (its ARP request is the datapath's first sight of the address), then the LAN "
        "host sends exactly one to the VM. The binding is created by the same program run that forwards that "
        "first ARP request, so the address is reachable from the LAN before the request has left the laptop.",
        "",
        f"- first probes lost, VM -> LAN: {learn['lost_out']}, LAN -> VM: {learn['lost_in']} "
        f"({verdict(learn['lost_out'] == learn['lost_in'] == 0)}, target 0)",
        f"- LAN host's first round trip to the new address (median): {learn['first_rtt_ms']:.3f} ms "
        f"({verdict(learn['first_rtt_ms'] is not None and learn['first_rtt_ms'] < bench.TARGET_LEARN_MS)}, "
        f"target < {bench.TARGET_LEARN_MS:g} ms)",
        "",
        "## 5. Cost of running it",
        "",
        f"Median of {run['samples']} attach(es).",
        "",
        "| what | measured | target | |",
        "| --- | ---: | ---: | --- |",
        f"| `macnat attach` until the datapath forwards | {run['attached_s']:.2f} s | < {bench.TARGET_ATTACH_S:g} s | "
        f"{verdict(run['attached_s'] < bench.TARGET_ATTACH_S)} |",
        f"| `macnat attach` until the manager runs | {run['managing_s']:.2f} s | | |",
        f"| manager resident memory (steady state) | {run['rss_mb']:.1f} MB | <= {bench.TARGET_RSS_MB:g} MB | "
        f"{verdict(run['rss_mb'] <= bench.TARGET_RSS_MB)} |",
    ]
    if run["sigterm_detach_s"] is not None:
        out.append(f"| detach: SIGTERM until everything is removed | {run['sigterm_detach_s']:.3f} s | "
                   f"< {bench.TARGET_DETACH_S:g} s | {verdict(run['sigterm_detach_s'] < bench.TARGET_DETACH_S)} |")
    if run["cli_detach_s"] is not None:
        out.append(f"| detach: the `macnat detach` command, start to finish | {run['cli_detach_s']:.3f} s | | |")
    out += [
        "",
        f"Where attach's time goes: the bcc compile of the datapath alone takes {run['compile_s']:.2f} s "
        "(clang over bpf/macnat.c; bcc's floor for an empty program is about 0.35 s here); `macnat attach` runs "
        "it in a thread beside the rest of its start-up and execs the manager afterwards. Importing the CLI "
        f"with pyroute2 in a fresh interpreter takes {run['cli_start_s']:.2f} s, most of a `macnat detach` "
        "command's time; the detach itself (SIGTERM to the manager, which removes everything) is the row above.",
        "",
    ]
    changes = []
    if worst < bench.TARGET_THROUGHPUT_RATIO or not ahead:
        changes.append(
            "- Throughput: macnat's programs are a fraction of a percent of the CPU in a transfer, so the remaining "
            "per-packet work is the kernel's: a frame macnat redirects runs through wlan0's egress hook a second "
            "time (a mark set by uplink_egress would let wifi_egress return at once), and the binding counters "
            "are atomic adds on a shared cache line (per-CPU counters would avoid that). Before that, measure "
            "on a machine with more cores, iperf3 and softirqs pinned: on 2 cores the rounds vary by about 30%.")
    if run["attached_s"] >= bench.TARGET_ATTACH_S:
        changes.append(
            "- Attach: the bcc compile is most of it, and it is paid on every attach. Loading a pre-built object "
            "(clang at build time, CO-RE) would take it to tens of milliseconds, at the price of a build step "
            "and a second loader next to bcc; a smaller source (fewer inlined helpers) would cut the compile "
            "a little.")
    if changes:
        out += ["## What we would change", "", *changes, ""]
    return "\n".join(out)


def draw(r: dict, path: Path) -> None:
    dp, labr = r["datapath"], r["lab"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
    names = [c.name for c in dp["paths"] if c.fast]
    values = [c.ns for c in dp["paths"] if c.fast]
    left.barh(names + ["empty TC program"], values + [dp["empty_ns"]],
              color=["tab:blue"] * len(values) + ["tab:gray"])
    left.axvline(dp["empty_ns"] * bench.TARGET_FAST_PATH_RATIO, color="tab:red", linestyle="--",
                 label=f"{bench.TARGET_FAST_PATH_RATIO:g}x the empty program")
    left.set_xlabel("ns per packet (BPF_PROG_TEST_RUN)")
    left.set_title("1. datapath fast paths")
    left.invert_yaxis()
    left.legend(loc="lower right")
    metrics = [("tcp_up", "TCP VM->LAN"), ("tcp_down", "TCP LAN->VM"), ("udp_up", "UDP64 VM->LAN"),
               ("udp_down", "UDP64 LAN->VM")]
    width = 0.8 / len(labr)
    for i, (key, row) in enumerate(labr.items()):
        xs = [j + i * width for j in range(len(metrics))]
        right.bar(xs, [row[m]["ratio"] for m, _ in metrics], width, label=f"({key}) {row['title']}")
    right.axhline(bench.TARGET_THROUGHPUT_RATIO, color="tab:red", linestyle="--", linewidth=1)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [label for _, label in metrics])
    right.set_ylabel("x of (a) plain bridging, median of per-round ratios")
    right.set_title("3. lab throughput")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

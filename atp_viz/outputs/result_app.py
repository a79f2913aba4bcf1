"""The README's tables about the app under use: the explorer's update time in a real browser and the
load test (12 browser sessions against one server). Both are measured by browser scripts in ``tests/``
(they need Chromium) and copied into ``docs/results/``; this module only renders them."""

from __future__ import annotations


def _md(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _load(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values) if values else "not recorded"


def render_latency(data: list[dict]) -> str:
    """Slider release to the updated metric on screen, per (model, tokens)."""
    (d,) = data
    rows = [
        [case.replace("@", " at ") + " tokens", f"{c['median_s']:.2f} s", f"{c['max_s']:.2f} s",
         ", ".join(f"{s:.2f}" for s in c["all_s"])]
        for case, c in d["cases"].items()
    ]  # fmt: skip
    return (
        _md(["explorer", f"median of {d['moves']} moves", "slowest", "every move (s)"], rows)
        + f"\n\nMeasured {d['when']}; load average (1 / 5 / 15 min) before "
        f"{_load(d['load_average_before'])}, after {_load(d['load_average_after'])} "
        "(the machine is shared: others' work was running)."
    )


def render_loadtest(data: list[dict]) -> str:
    """Per round (fresh server, warm server): open and update times, own numbers, exceptions."""
    (d,) = data
    rows = []
    for name, r in d["rounds"].items():
        cpu = r.get("server_cpu_s_per_move")
        rows.append(
            [name, r["sessions"], f"{r['open_all_s']:.0f} s",
             f"{r['update_median_s']:.1f} s / {r['update_p95_s']:.1f} s",
             f"{r['rerun_done_median_s']:.1f} s / {r['rerun_done_p95_s']:.1f} s",
             "not recorded" if cpu is None else f"{cpu:.2f} s",
             "yes (all equal to the CLI, 4 decimals)" if r["own_numbers"] else "**no**",
             len(r["exceptions"])]
        )  # fmt: skip
    cap = d["rounds"].get("warm", {}).get("heavy_job_cap")
    cap_line = ""
    if cap:
        refused = [s for s in cap["sessions"] if s["refused"]]
        cap_line = (
            f"\n\nHeavy-job cap, {len(cap['sessions'])} sessions starting a rank sweep at once: "
            f"{len(cap['sessions']) - len(refused)} ran, {len(refused)} were refused with a message after "
            f"{max(s['answered_s'] for s in refused):.1f} s at most, progress bars left behind: "
            f"{sum(s['progress_bars'] for s in cap['sessions'])}."
        )
    return (
        _md(
            [
                "server",
                "sessions",
                "all 12 opened",
                "update median / p95",
                "whole rerun median / p95",
                "server CPU per move",
                "own numbers",
                "exceptions",
            ],
            rows,
        )  # fmt: skip
        + cap_line
        + f"\n\nServer peak memory (VmHWM) {d['server_peak_rss_mb']:.0f} MB. Load average (1 / 5 / 15 min) "
        f"at the start {_load(d['load_average_start'])}, after the rounds "
        f"{_load(d['load_average_after_rounds'])}. Overall: {'passed' if d['ok'] else '**failed**'}."
    )

"""Every figure the README quotes comes from a file in ``docs/results/`` (or a run's JSON), and this
module is the one place that turns those files into the README's tables.

The README holds each table between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``python -m atp_viz results --check`` renders every table from its files and fails when the README
differs (``make test`` runs it), ``--write`` puts them in, ``--measure NAME`` reruns the measurement
behind a table and rewrites its file (each says how long that takes).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atp_viz.core.progress import ProgressFn
from atp_viz.outputs import result_app as app_tables
from atp_viz.outputs import result_centred as centred
from atp_viz.outputs import result_control as control
from atp_viz.outputs import result_gate as gate
from atp_viz.outputs import result_goals as goals
from atp_viz.outputs import result_tables as tables
from atp_viz.outputs import result_tuning as tuning
from atp_viz.outputs import result_window as window

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "docs" / "results"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Result:
    name: str
    files: tuple[str, ...]  # paths relative to the repository root
    render: Callable[[list[dict]], str]  # the files' JSON -> markdown
    command: str  # what regenerates the files
    minutes: float  # about how long that takes on this project's 2-core machine
    # (out, progress) -> the JSON for RESULTS_DIR/<name>.json; progress says how far the measurement is
    measure: Callable[[Path, ProgressFn], dict] | None = None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.relative_to(ROOT)} is missing: run the command that makes it.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.relative_to(ROOT)} is not valid JSON: {err}") from None


def rendered(result: Result) -> str:
    """The markdown of one table, with the line saying where its numbers come from."""
    data = [_read(ROOT / f) for f in result.files]
    where = ", ".join(f"`{f}`" for f in result.files) or "no file yet"
    body = result.render(data).rstrip()
    if not result.minutes:  # a summary of other tables' files: nothing of its own to measure
        return f"{body}\n\nSource: {where}; {result.command}."
    return (
        f"{body}\n\nSource: {where}; regenerate with `{result.command}` (about {result.minutes:g} min on "
        "this project's 2-core machine)."
    )


def _block(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- results:{re.escape(name)} -->\n)(.*?)\n?(<!-- /results:{re.escape(name)} -->)", re.S
    )


def render_readme(text: str, results: tuple[Result, ...]) -> str:
    """``text`` with every results block replaced by its table; ValueError for a block that is missing."""
    for result in results:
        pattern = _block(result.name)
        if not pattern.search(text):
            raise ValueError(
                f"README has no block <!-- results:{result.name} --> ... <!-- /results:{result.name} -->"
            )
        table = rendered(result)
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(3), text)
    return text


def check(readme: Path = README, results: tuple[Result, ...] | None = None) -> list[str]:
    """Problems between the README and the result files (empty: the README says what the files say)."""
    results = RESULTS if results is None else results
    text = readme.read_text()
    try:
        expected = render_readme(text, results)
    except ValueError as err:
        return [str(err)]
    problems = []
    for result in results:
        have, want = _block(result.name).search(text), _block(result.name).search(expected)
        if have.group(2) != want.group(2):
            problems.append(f"README table '{result.name}' differs from what {', '.join(result.files)} say")
    known = {m.group(1) for m in re.finditer(r"<!-- results:([\w-]+) -->", text)}
    problems += [
        f"README block '{n}' has no result of that name" for n in sorted(known - {r.name for r in results})
    ]
    return problems


def write(readme: Path = README) -> None:
    readme.write_text(render_readme(readme.read_text(), RESULTS))


def measure(name: str, progress: ProgressFn | None = None) -> Path:
    """Rerun the measurement behind ``name`` and write its JSON (with its command and duration);
    ``progress`` hears how far it is (they take 1 to 35 minutes)."""
    result = next((r for r in RESULTS if r.name == name), None)
    if result is None or result.measure is None:
        names = ", ".join(r.name for r in RESULTS if r.measure)
        raise ValueError(f"No measurement called {name!r}; these can be measured: {names}.")
    t0 = time.perf_counter()
    out = ROOT / result.files[0]
    data: dict[str, Any] = result.measure(out, progress or (lambda fraction, message: None))
    data["command"] = result.command
    data["seconds"] = time.perf_counter() - t0
    data["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def _measured(name: str, render, minutes: float, measure) -> Result:
    """A table measured by ``python -m atp_viz results --measure NAME`` into ``docs/results/NAME.json``."""
    return Result(
        name, (f"docs/results/{name}.json",), render, f"python -m atp_viz results --measure {name}", minutes,
        measure,
    )  # fmt: skip


# The README's tables, in README order.
RESULTS: tuple[Result, ...] = (
    _measured("untuned-minilm", tables.render_untuned_minilm, 1, tables.measure_untuned_minilm),
    _measured("untuned-smollm2", tables.render_untuned_smollm2, 6, tables.measure_untuned_smollm2),
    _measured("forms-minilm", tuning.render_forms_minilm, 10, tuning.measure_forms_minilm),
    _measured("projection-split-minilm", tuning.render_projection_split, 3, tuning.measure_projection_split),
    _measured("centred-minilm", centred.render_centred_minilm, 15, centred.measure_centred_minilm),
    _measured("sinks-smollm2", tables.render_sinks, 2, tables.measure_sinks),
    _measured("perplexity-smollm2", tables.render_perplexity, 35, tables.measure_perplexity),
    _measured("layer-split-smollm2", tables.render_layer_split, 18, tables.measure_layer_split),
    _measured("centred-smollm2", centred.render_centred_smollm2, 33, centred.measure_centred_smollm2),
    _measured("generation-smollm2", tables.render_generation, 3, tables.measure_generation),
    Result(
        "goals",
        tuning.run_files("minilm") + tuning.run_files("smollm2") + tuning.prefill_files() + control.files(),
        goals.render_goals,
        "each file holds the command that made it (the fine-tuning tables below and the long-context "
        "section give them)",
        0,
    ),  # fmt: skip
    Result(
        "runs-minilm",
        tuning.run_files("minilm"),
        tuning.render_runs,
        "python -m atp_viz finetune --model minilm ... (each run's command is in its JSON)",
        15,
    ),  # fmt: skip
    _measured("length-minilm", tuning.render_length_minilm, 14, tuning.measure_length_minilm),
    Result(
        "runs-smollm2",
        tuning.run_files("smollm2"),
        tuning.render_runs,
        "python -m atp_viz finetune --model smollm2 ... (each run's command is in its JSON)",
        45,
    ),  # fmt: skip
    Result(
        "prefill-smollm2",
        tuning.prefill_files(),
        tuning.render_prefill,
        "python -m atp_viz bench --prefill --model smollm2 --tokens 2048,4096,8192 --form FORM --rank 128 "
        "--basis-from keys --basis-update moments|recompute --threads 1 "
        "--json docs/results/prefill-smollm2-FORM.json; the exact window alone: --tokens 8192 "
        "--window W --sinks 4 --drop-middle --basis-from keys --threads 1 "
        "--json docs/results/prefill-smollm2-windowW.json; the tuned run: --model "
        "tuned:data/tuned/smollm2-pksoftmax-r128-window512-two-stage --form pksoftmax --rank 128 "
        "--window 512 --sinks 4 --basis-from keys --basis-update moments [--tokens 8192 --drop-middle] "
        "--threads 1 --json docs/results/prefill-smollm2-tuned-pksoftmax-window512.json "
        "(-tuned-window512-dropped.json)",
        105,
    ),  # fmt: skip
    _measured("control-smollm2", control.render_control_smollm2, 24, control.measure_control_smollm2),
    _measured("ceilings-smollm2", tuning.render_prefill_ceilings, 1, tuning.measure_prefill_ceilings),
    _measured("window-smollm2", window.render_window, 11, window.measure_window_smollm2),
    _measured("gate-smollm2", gate.render_gate, 16, gate.measure_gate_smollm2),
    _measured("window-ceilings-smollm2", gate.render_window_ceilings, 1, gate.measure_window_ceilings),
    Result(
        "bench-layer",
        ("docs/bench-reference.json",),
        tables.render_bench_layer,
        "python -m atp_viz bench --threads 1 --max-repeats 15 --json docs/bench-reference.json",
        15,
    ),  # fmt: skip
    Result(
        "bench-model",
        ("docs/bench-reference.json",),
        tables.render_bench_model,
        "python -m atp_viz bench --threads 1 --max-repeats 15 --json docs/bench-reference.json",
        15,
    ),  # fmt: skip
    _measured("basis-energy", tables.render_basis_energy, 3, tables.measure_basis_energy),
    Result(
        "latency",
        ("docs/results/latency.json",),
        app_tables.render_latency,
        "pytest tests/test_browser_load.py -k update_time && cp test-artifacts/latency.json docs/results/",
        3,
    ),  # fmt: skip
    Result(
        "loadtest",
        ("docs/results/loadtest.json",),
        app_tables.render_loadtest,
        "make loadtest (copies test-artifacts/loadtest.json to docs/results/ when it passes)",
        8,
    ),  # fmt: skip
)


def table(name: str) -> str:
    """One README table, rendered now from its files (with its source line), e.g. ``table("goals")`` for
    the app's scoreboard. ValueError when a file is missing (an installed copy without ``docs/``)."""
    result = next((r for r in RESULTS if r.name == name), None)
    if result is None:
        raise ValueError(f"No table called {name!r}; these exist: {', '.join(r.name for r in RESULTS)}.")
    if not result.files:
        raise ValueError(f"no file behind the {name!r} table was found (docs/ is not in this copy?).")
    return rendered(result)


def readme_part(name: str) -> str:
    """A stretch of the README's prose between ``<!-- part:NAME -->`` and ``<!-- /part:NAME -->``, for the
    app to show what the README says next to a table (written once, in the README, where its figures'
    tables are). ValueError when this copy has no README or the README no such part."""
    try:
        text = README.read_text()
    except FileNotFoundError:
        raise ValueError("the README is not in this copy") from None
    found = re.search(rf"<!-- part:{re.escape(name)} -->\n(.*?)<!-- /part:{re.escape(name)} -->", text, re.S)
    if found is None:
        raise ValueError(f"the README has no part {name!r}")
    return found.group(1).strip()

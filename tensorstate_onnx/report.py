"""Summaries of an analysis: per-probe statistics, network efficiency, accuracy and aIQ,
as a text table, JSON, CSV or a plot."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field

from ._optional import import_optional
from .errors import MissingFileError, ModelInputError, OptionError
from .metrics import aIQ, network_efficiency

__all__ = [
    "LayerSummary", "AnalysisReport", "ReportFile", "summarize", "read_report", "read_reports",
    "compare_table", "plot_comparison",
]  # fmt: skip


@dataclass
class LayerSummary:
    """Statistics of one probe; ``channel_axis`` is the axis of the probed tensor that
    holds the neurons (1 for a rank-1 tensor, read as ``[N, 1]``)."""

    name: str
    node: str
    neurons: int
    states: int
    distinct_states: int
    entropy: float
    efficiency: float
    channel_axis: int | None = None
    #: Neurons that fired in no state, and in every state.
    dead_neurons: int | None = None
    always_firing: int | None = None
    #: Per neuron, the fraction of states in which it fired (JSON and plots; not in the CSV).
    firing_rates: list[float] | None = field(default=None, repr=False)


#: LayerSummary fields written as CSV columns (per-neuron lists are not).
_CSV_FIELDS = [name for name in LayerSummary.__dataclass_fields__ if name != "firing_rates"]


@dataclass
class AnalysisReport:
    """Everything ``tensorstate-onnx analyze`` reports."""

    layers: list[LayerSummary]
    network_efficiency: float
    accuracy: float | None = None
    aiq: float | None = None
    aiq_weight: int | None = None
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        """A fixed-width text table followed by the network figures."""
        header = ("probe", "node", "neurons", "states", "distinct", "dead", "always", "entropy", "efficiency")
        rows = [
            (
                layer.name, layer.node, str(layer.neurons), str(layer.states), str(layer.distinct_states),
                _count_text(layer.dead_neurons), _count_text(layer.always_firing),
                f"{layer.entropy:.4f}", f"{layer.efficiency:.4f}",
            )
            for layer in self.layers
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"network efficiency: {self.network_efficiency:.4f}")
        lines.extend(self.zero_efficiency_notes())
        if self.accuracy is not None:
            lines.append(f"accuracy:           {self.accuracy:.4f}")
            lines.append(f"aIQ (weight {self.aiq_weight}):     {self.aiq:.4f}")
        return "\n".join(lines)

    def zero_efficiency_notes(self) -> list[str]:
        """Why the network efficiency is 0: one line naming each probe that saw a
        single state (entropy 0, so efficiency 0 and a geometric mean of 0)."""
        single = [layer for layer in self.layers if layer.distinct_states <= 1]
        if self.network_efficiency != 0 or not single:
            return []
        reasons = ", ".join(f"{layer.name} ({_single_state_reason(layer)})" for layer in single)
        probes = "probe" if len(single) == 1 else "probes"
        return [
            f"why 0: {probes} {reasons} saw a single state on this data, so efficiency 0 "
            "(the network efficiency is the geometric mean)"
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per probe; network figures repeat on every row for easy joins."""
        names = _CSV_FIELDS
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, "network_efficiency", "accuracy", "aiq"])
            for layer in self.layers:
                writer.writerow([*(getattr(layer, n) for n in names), self.network_efficiency, self.accuracy, self.aiq])

    def plot(self, path: str | os.PathLike) -> None:
        """Bar chart of efficiency per probe (needs matplotlib: the ``plot`` extra)."""
        check_plot_format(path)
        from matplotlib.figure import Figure

        # A Figure of its own: no pyplot state, no change to the caller's backend.
        fig = Figure(figsize=(max(6.0, 0.7 * len(self.layers) + 2), 4.0))
        ax = fig.subplots()
        ax.bar([layer.name for layer in self.layers], [layer.efficiency for layer in self.layers], color="#4477aa")
        ax.axhline(self.network_efficiency, color="#cc3311", linestyle="--", label=f"network {self.network_efficiency:.3f}")
        ax.set_ylabel("efficiency (H / neurons)")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper right")
        ax.tick_params(axis="x", labelrotation=45)
        title = "layer efficiency"
        if self.aiq is not None:
            title += f"  (accuracy {self.accuracy:.3f}, aIQ {self.aiq:.3f})"
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    def plot_firing_rates(self, path: str | os.PathLike) -> None:
        """Firing rates per probe, one panel each: every neuron's rate, sorted from
        the most to the least active, with the dead and always-firing counts
        (needs matplotlib: the ``plot`` extra)."""
        check_plot_format(path)
        layers = [layer for layer in self.layers if layer.firing_rates is not None]
        if not layers:
            raise OptionError("the report holds no firing rates to plot (summarize() a model after a run)")
        from matplotlib.figure import Figure

        columns = min(3, len(layers))
        rows = -(-len(layers) // columns)
        fig = Figure(figsize=(4.0 * columns, 2.8 * rows))
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax, layer in zip(axes.flat, layers):
            rates = sorted(layer.firing_rates, reverse=True)
            ax.bar(range(len(rates)), rates, width=1.0, color="#4477aa")
            ax.set_ylim(0, 1)
            ax.set_xlim(-0.5, len(rates) - 0.5)
            ax.set_title(
                f"{layer.name}\n{layer.dead_neurons} dead, {layer.always_firing} always firing", fontsize=9
            )
            ax.set_xlabel("neurons, most active first", fontsize=8)
            ax.set_ylabel("firing rate", fontsize=8)
        for ax in list(axes.flat)[len(layers) :]:
            ax.set_visible(False)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def _single_state_reason(layer: LayerSummary) -> str:
    """What the one state of a probe looked like, from its dead/always-firing counts."""
    if layer.dead_neurons is None or layer.always_firing is None:
        return "every input gave the same firing pattern"
    if layer.dead_neurons == layer.neurons:
        return f"none of its {layer.neurons} neurons ever fired: all values <= 0"
    if layer.always_firing == layer.neurons:
        return f"all {layer.neurons} neurons fired on every input"
    return f"the same {layer.always_firing} of {layer.neurons} neurons fired on every input"


def _count_text(count: int | None) -> str:
    return "-" if count is None else str(count)


def check_plot_format(path: str | os.PathLike) -> None:
    """Raise unless matplotlib is installed and can write an image of ``path``'s type."""
    Figure = import_optional("matplotlib.figure", "plot", "plotting").Figure
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise OptionError(
            f"cannot plot to {os.fspath(path)!r}: {suffix or 'no'} extension; "
            f"use one of {', '.join(sorted(supported))} (.png for a bitmap)"
        )


def summarize(model, accuracy: float | None = None, aiq_weight: int = 2) -> AnalysisReport:
    """Collect the report of a model built by ``build_efficiency_model`` after a run."""
    layers = [
        LayerSummary(
            name=layer.name,
            node=str(layer.metadata.get("node", layer.name)) if hasattr(layer, "metadata") else layer.name,
            neurons=int(layer.max_entropy()),
            states=layer.state_count,
            distinct_states=layer.distinct_count,
            entropy=layer.entropy(),
            efficiency=layer.efficiency(),
            channel_axis=getattr(layer, "channel_axis", None),
            **_firing(layer),
        )
        for layer in model.efficiency_layers
    ]
    net = network_efficiency([layer.efficiency for layer in layers])
    score = None if accuracy is None else aIQ(net, accuracy, aiq_weight)
    return AnalysisReport(layers, net, accuracy, score, aiq_weight if accuracy is not None else None)


def _firing(layer) -> dict:
    """Dead and always-firing neuron counts and the firing rates of one probe."""
    if not hasattr(layer, "firing_counts"):
        return {}
    counts = layer.firing_counts()
    return {
        "dead_neurons": int((counts == 0).sum()),
        "always_firing": int((counts == layer.state_count).sum()),
        "firing_rates": (counts / layer.state_count).tolist(),
    }


# ---------------------------------------------------------------------- comparing runs


@dataclass
class ReportFile:
    """The figures of one saved report (``--json``) that ``compare`` sets side by side."""

    label: str
    efficiencies: dict[str, float]
    network_efficiency: float
    accuracy: float | None = None
    aiq: float | None = None
    aiq_weight: int | None = None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_report(path: str | os.PathLike, label: str | None = None) -> ReportFile:
    """Read a report written by ``AnalysisReport.write_json`` (``analyze --json``).

    Raises MissingFileError for a missing file and ModelInputError for a
    directory or a file that is not such a report.
    """
    file = os.fspath(path)
    label = os.path.splitext(os.path.basename(file))[0] if label is None else label
    if os.path.isdir(file):
        raise ModelInputError(f"report {file} is a directory; pass the .json file written by analyze --json")
    if not os.path.isfile(file):
        raise MissingFileError(f"report file {file} does not exist")
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"{file} is not a report JSON (written by analyze --json): {exc}") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    valid = (
        isinstance(layers, list)
        and all(
            isinstance(layer, dict) and isinstance(layer.get("name"), str) and _number(layer.get("efficiency"))
            for layer in layers
        )
        and _number(data.get("network_efficiency"))
        and all(data.get(key) is None or _number(data.get(key)) for key in ("accuracy", "aiq", "aiq_weight"))
    )
    if not valid:
        raise ModelInputError(
            f"{file} is not a report JSON (written by analyze --json): it needs 'layers' "
            "(each with a 'name' and an 'efficiency') and a 'network_efficiency'"
        )
    fractions = {f"efficiency of {layer['name']!r}": layer["efficiency"] for layer in layers}
    fractions.update((key, data.get(key)) for key in ("network_efficiency", "accuracy", "aiq"))
    for what, value in fractions.items():
        if value is not None and not 0 <= value <= 1:  # NaN fails too
            raise ModelInputError(f"{file} is not a sound report: its {what} is {value}, not a number in [0, 1]")
    weight = data.get("aiq_weight")
    if weight is not None and not (isinstance(weight, int) and weight >= 1):
        raise ModelInputError(f"{file} is not a sound report: its aiq_weight is {weight}, not an int >= 1")
    return ReportFile(
        label,
        {layer["name"]: float(layer["efficiency"]) for layer in layers},
        float(data["network_efficiency"]),
        data.get("accuracy"),
        data.get("aiq"),
        data.get("aiq_weight"),
    )


def read_reports(paths) -> list[ReportFile]:
    """Read several reports, labelled by file name (by path where names repeat)."""
    paths = [os.fspath(path) for path in paths]
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    repeated = {stem for stem in stems if stems.count(stem) > 1}
    return [read_report(path, path if stem in repeated else stem) for path, stem in zip(paths, stems)]


def _layer_names(reports: list[ReportFile]) -> list[str]:
    names: dict[str, None] = {}
    for report in reports:
        names.update(dict.fromkeys(report.efficiencies))
    return list(names)


def compare_table(reports: list[ReportFile]) -> str:
    """The reports side by side: per-probe efficiency, network efficiency, accuracy
    and aIQ; a probe a report does not have is shown as ``-``."""

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    weights = {report.aiq_weight for report in reports if report.aiq_weight is not None}
    aiq_label = f"aIQ (weight {next(iter(weights))})" if len(weights) == 1 else "aIQ"
    rows = [(name, *(cell(report.efficiencies.get(name)) for report in reports)) for name in _layer_names(reports)]
    figures = [
        ("network efficiency", *(cell(report.network_efficiency) for report in reports)),
        ("accuracy", *(cell(report.accuracy) for report in reports)),
        (aiq_label, *(cell(report.aiq) for report in reports)),
    ]
    header = ("probe", *(report.label for report in reports))
    table = [header, *rows, *figures]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths), *map(line, rows), "", *map(line, figures)]
    if len(weights) > 1:
        given = ", ".join(f"{r.label} {r.aiq_weight}" for r in reports if r.aiq_weight is not None)
        lines.append(f"aIQ weights differ ({given}): their aIQ values do not compare")
    return "\n".join(lines)


def plot_comparison(reports: list[ReportFile], path: str | os.PathLike) -> None:
    """Grouped bars: each probe's efficiency and the network efficiency, one colour per
    report, accuracy and aIQ in the legend (needs matplotlib: the ``plot`` extra)."""
    check_plot_format(path)
    from matplotlib.figure import Figure

    names = [*_layer_names(reports), "network"]
    width = 0.8 / len(reports)
    fig = Figure(figsize=(max(6.0, 0.4 * len(names) * len(reports) + 2), 4.2))
    ax = fig.subplots()
    for k, report in enumerate(reports):
        values = {**report.efficiencies, "network": report.network_efficiency}
        xs = [i + (k - (len(reports) - 1) / 2) * width for i, name in enumerate(names) if name in values]
        label = report.label
        if report.aiq is not None and report.accuracy is not None:
            label += f" (accuracy {report.accuracy:.3f}, aIQ {report.aiq:.3f})"
        ax.bar(xs, [values[name] for name in names if name in values], width=width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("efficiency (H / neurons)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("efficiency per probe (missing bars: the report has no such probe)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

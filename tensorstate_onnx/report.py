"""Summaries of an analysis: per-probe statistics, network efficiency, accuracy and aIQ,
as a text table, JSON, CSV or a plot."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field

from ._optional import import_optional
from .errors import OptionError
from .metrics import aIQ, network_efficiency

__all__ = ["LayerSummary", "AnalysisReport", "summarize"]


@dataclass
class LayerSummary:
    """Statistics of one probe."""

    name: str
    node: str
    neurons: int
    states: int
    distinct_states: int
    entropy: float
    efficiency: float


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
        header = ("probe", "node", "neurons", "states", "distinct", "entropy", "efficiency")
        rows = [
            (
                layer.name, layer.node, str(layer.neurons), str(layer.states), str(layer.distinct_states),
                f"{layer.entropy:.4f}", f"{layer.efficiency:.4f}",
            )
            for layer in self.layers
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"network efficiency: {self.network_efficiency:.4f}")
        if self.accuracy is not None:
            lines.append(f"accuracy:           {self.accuracy:.4f}")
            lines.append(f"aIQ (weight {self.aiq_weight}):     {self.aiq:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per probe; network figures repeat on every row for easy joins."""
        names = list(LayerSummary.__dataclass_fields__)
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
        )
        for layer in model.efficiency_layers
    ]
    net = network_efficiency([layer.efficiency for layer in layers])
    score = None if accuracy is None else aIQ(net, accuracy, aiq_weight)
    return AnalysisReport(layers, net, accuracy, score, aiq_weight if accuracy is not None else None)

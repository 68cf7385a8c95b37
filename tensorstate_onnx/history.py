"""Efficiency over training: one record per measured epoch, saved as JSON/CSV and plotted.

Framework-free: :class:`~tensorstate_onnx.torch_training.EfficiencyTracker` and
:class:`~tensorstate_onnx.keras_training.EfficiencyCallback` fill an
:class:`EfficiencyHistory`; this module imports neither torch nor keras.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

from numbers import Integral

from .errors import OptionError

__all__ = ["EfficiencyHistory", "EpochRecord", "check_every", "measured_record"]

_FORMAT = "tensorstate-onnx/efficiency-history"
_CSV_HEADER = ["epoch", "probe", "efficiency", "network_efficiency", "accuracy", "aiq"]


@dataclass(frozen=True)
class EpochRecord:
    """What one measurement after ``epoch`` found.

    ``efficiencies`` maps each probe's name to its efficiency, in probe order;
    ``accuracy`` and ``aiq`` are ``None`` when no labels were given.
    """

    epoch: int
    efficiencies: dict[str, float] = field(default_factory=dict)
    network_efficiency: float = 0.0
    accuracy: float | None = None
    aiq: float | None = None

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "efficiencies": dict(self.efficiencies),
            "network_efficiency": self.network_efficiency,
            "accuracy": self.accuracy,
            "aiq": self.aiq,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EpochRecord":
        try:
            return cls(
                epoch=int(data["epoch"]),
                efficiencies={str(k): float(v) for k, v in data["efficiencies"].items()},
                network_efficiency=float(data["network_efficiency"]),
                accuracy=None if data.get("accuracy") is None else float(data["accuracy"]),
                aiq=None if data.get("aiq") is None else float(data["aiq"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OptionError(f"not an efficiency history record: {data!r} ({exc})") from None


class EfficiencyHistory(list):
    """A list of :class:`EpochRecord`, oldest first, with ``to_json``, ``to_csv`` and ``plot``."""

    @property
    def epochs(self) -> list[int]:
        """The measured epochs, in order."""
        return [record.epoch for record in self]

    @property
    def probes(self) -> list[str]:
        """Every probe name seen, in the order first seen."""
        names: dict[str, None] = {}
        for record in self:
            names.update(dict.fromkeys(record.efficiencies))
        return list(names)

    def efficiency(self, probe: str) -> list[float]:
        """``probe``'s efficiency at each measured epoch (NaN where it was not measured)."""
        if probe not in self.probes:
            raise OptionError(f"no probe {probe!r} in the history; probes: {', '.join(self.probes) or '(none)'}")
        return [record.efficiencies.get(probe, math.nan) for record in self]

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "records": [record.to_dict() for record in self]}

    @classmethod
    def from_dict(cls, data: dict) -> "EfficiencyHistory":
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("records"), list):
            raise OptionError("not an efficiency history (written by EfficiencyHistory.to_json)")
        return cls(EpochRecord.from_dict(record) for record in data["records"])

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the history as JSON (read it back with :meth:`from_json`)."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EfficiencyHistory":
        """Read a history written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as exc:
                raise OptionError(f"{os.fspath(path)!r} is not JSON: {exc}") from None
        return cls.from_dict(data)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per record and probe: ``epoch, probe, efficiency``, then the
        record's ``network_efficiency, accuracy, aiq`` (empty cells for ``None``;
        a record without probes is one row with empty probe and efficiency).
        A record's rows are consecutive, so records sharing an epoch (a second
        training phase counting from 0 again) stay apart."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(_CSV_HEADER)
            for record in self:
                tail = [_text(v) for v in (record.network_efficiency, _cell(record.accuracy), _cell(record.aiq))]
                for probe, value in record.efficiencies.items() or [("", "")]:
                    writer.writerow([record.epoch, probe, _text(value), *tail])

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "EfficiencyHistory":
        """Read a history written by :meth:`to_csv`, record by record."""
        entries: list[dict] = []
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != _CSV_HEADER:
                raise OptionError(f"{os.fspath(path)!r} is not an efficiency history CSV (columns {_CSV_HEADER})")
            for row in reader:
                tail = {key: row[key] or None for key in ("network_efficiency", "accuracy", "aiq")}
                entry = entries[-1] if entries else None
                # A record's rows are consecutive: a new one starts at another epoch or
                # network-wide values, at a probe the record already has, or after a record without probes.
                if (
                    entry is None or not entry["efficiencies"] or not row["probe"]
                    or row["probe"] in entry["efficiencies"] or entry["epoch"] != row["epoch"]
                    or any(entry[key] != value for key, value in tail.items())
                ):  # fmt: skip
                    entry = {"epoch": row["epoch"], "efficiencies": {}, **tail}
                    entries.append(entry)
                if row["probe"]:
                    entry["efficiencies"][row["probe"]] = row["efficiency"]
        return cls(EpochRecord.from_dict(entry) for entry in entries)

    def plot(self, path: str | os.PathLike) -> None:
        """Efficiency of each probe and the network over the epochs, and aIQ when
        measured (needs matplotlib: the ``plot`` extra)."""
        from .report import check_plot_format

        check_plot_format(path)
        if not self:
            raise OptionError("the history is empty: nothing was measured yet")
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        with_aiq = any(record.aiq is not None for record in self)
        fig = Figure(figsize=(11.0 if with_aiq else 6.5, 4.0))
        axes = fig.subplots(1, 2 if with_aiq else 1, squeeze=False)[0]
        epochs = self.epochs
        for probe in self.probes:
            axes[0].plot(epochs, self.efficiency(probe), marker="o", markersize=3, label=probe)
        axes[0].plot(epochs, [r.network_efficiency for r in self], color="black", linestyle="--", label="network")
        axes[0].set_title("efficiency per layer", fontsize=10)
        axes[0].set_ylabel("efficiency (H / neurons)")
        axes[0].set_ylim(0, 1)
        axes[0].legend(fontsize=7, loc="best")
        if with_aiq:
            aiq = [math.nan if r.aiq is None else r.aiq for r in self]
            accuracy = [math.nan if r.accuracy is None else r.accuracy for r in self]
            axes[1].plot(epochs, aiq, marker="o", color="#cc3311", label="aIQ")
            axes[1].plot(epochs, accuracy, marker="s", color="#4477aa", linestyle=":", label="accuracy")
            axes[1].set_title("aIQ over training", fontsize=10)
            axes[1].set_ylim(0, 1)
            axes[1].legend(fontsize=8, loc="best")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def check_every(every) -> int:
    """``every`` (measure every N epochs) as an int >= 1, or OptionError."""
    if isinstance(every, bool) or not isinstance(every, Integral) or every < 1:
        raise OptionError(f"every must be an int >= 1 (measure every N epochs), got {every!r}")
    return int(every)


def measured_record(epoch: int, efficiencies: dict[str, float], correct: int, total: int, aiq_weight: int) -> EpochRecord:
    """The record of one measurement: the network efficiency of ``efficiencies``,
    and accuracy and aIQ from ``correct`` of ``total`` predictions (``None`` when
    ``total`` is 0: no labels)."""
    from .metrics import aIQ, network_efficiency

    network = network_efficiency(list(efficiencies.values()))
    accuracy = correct / total if total else None
    aiq = None if accuracy is None else aIQ(network, accuracy, aiq_weight)
    return EpochRecord(int(epoch), dict(efficiencies), network, accuracy, aiq)


def _cell(value: float | None):
    return "" if value is None else value


def _text(value) -> str:
    return value if isinstance(value, str) else repr(float(value))  # float(): no "np.float64(...)"

"""The saturation run as a picture: latency percentiles and server CPU per delivery at
each step, for each target measured. matplotlib is optional (the ``bench`` extra) and
imported only here, only when a plot is asked for."""

from __future__ import annotations

import math
from typing import Any

#: The one line a run prints when --plot is asked for without matplotlib.
MISSING = "bench: --plot needs matplotlib: pip install -e '.[bench]'"

#: Each target's line and marker: our gateways solid with dots, the classroom server dashed
#: with hollow squares (told apart even where a run has one step only).
_STYLES = {"gateways": ("-", "o", None), "classroom": ("--", "s", "none")}
_PERCENTILES = (("p50_ms", "p50", "tab:green"), ("p90_ms", "p90", "tab:orange"),
                ("p99_ms", "p99", "tab:red"))  # fmt: skip


def require() -> None:
    """Fail at once, in one line, if matplotlib is missing (before a long run, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING) from None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def saturation_png(steps: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> None:
    """Write ``path`` (PNG): ``steps`` maps a target's name to its saturation steps (each a
    ``Run.as_dict()``); x is the offered deliveries a second of each step."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(MISSING) from None

    fig, (latency, cpu) = plt.subplots(2, 1, sharex=True, figsize=(8, 7))
    for target, runs in steps.items():
        line, marker, face = _STYLES.get(target, (":", "^", None))
        look = {"linestyle": line, "marker": marker, "markerfacecolor": face}
        x = [_number(r["offered_msgs_per_s"]) * _number(r["clients"]) for r in runs]
        for key, label, colour in _PERCENTILES:
            latency.plot(x, [_number(r[key]) for r in runs], color=colour,
                         label=f"{target} {label}", **look)  # fmt: skip
        cpu.plot(x, [_number(r.get("server_cpu_us_per_delivery")) for r in runs],
                 color="tab:blue", label=target, **look)  # fmt: skip
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend(fontsize="small")
    cpu.set_xscale("log")
    cpu.set_xlabel("offered deliveries per second (each saturation step)")
    cpu.set_ylabel("server CPU per delivery (µs)")
    cpu.set_ylim(bottom=0)
    cpu.grid(True, which="both", alpha=0.3)
    cpu.legend(fontsize="small")
    fig.suptitle(title or "saturation: latency and server CPU per delivery")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)

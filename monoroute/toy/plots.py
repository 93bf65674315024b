"""PNG figures for the toy experiments (matplotlib, Agg backend). Each takes a results dict."""
from __future__ import annotations

from pathlib import Path

import matplotlib

from monoroute.toy.abs_task import zero_output_loss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 90  # keeps every figure well under 200 KB


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_tms(results: dict, out: Path) -> list[Path]:
    """tms_small.png: ‖W_i‖ per feature, coloured by superposition (Elhage fig. 'sparsity sweep');
    tms_dimensionality.png: D* and every D_i against 1/(1-S), with the 1 and 1/2 lines."""
    paths = []
    fig, axes = plt.subplots(2, len(results["small_relu"]["instances"]), figsize=(2.4 * 5, 4.5), squeeze=False)
    for row, name in enumerate(("small_relu", "small_linear")):
        for ax, inst in zip(axes[row], results[name]["instances"]):
            colours = plt.cm.viridis([min(s, 1.0) for s in inst["superposition"]])
            ax.barh(range(len(inst["norms"])), inst["norms"], color=colours)
            ax.invert_yaxis()
            ax.set_xlim(0, 1.3)
            ax.set_title(f"{name.split('_')[1]}  density {inst['density']:.2g}", fontsize=8)
            ax.set_yticks([])
    axes[1][0].set_xlabel("‖W_i‖ (colour: superposition)")
    paths.append(_save(fig, out / "tms_small.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = results["large_relu"]["instances"]
    x = [1 / r["density"] for r in rows]
    for xi, r in zip(x, rows):
        ax.scatter([xi] * len(r["feature_dimensionality"]), r["feature_dimensionality"], s=2, alpha=0.15, color="C0")
    ax.plot(x, [r["dimensions_per_feature"] for r in rows], "k.-", label="D* = m / ‖W‖_F²")
    for level in (1, 0.5):
        ax.axhline(level, ls="--", lw=0.7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("1 / (1 - S)  (inverse feature density)")
    ax.set_ylabel("dimensions per feature")
    ax.set_title(f"TMS n={results['large_relu']['n']}, m={results['large_relu']['m']}: D* and D_i")
    ax.legend()
    paths.append(_save(fig, out / "tms_dimensionality.png"))
    return paths


def plot_abs(results: dict, out: Path) -> list[Path]:
    """abs_headline.png: monosemantic fraction and loss against feature density, per model."""
    cfg = results["config"]
    fig, (ax_mono, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, r) in enumerate(results["models"].items()):
        densities = sorted(float(d) for d in r["by_density"])
        rows = [r["by_density"][str(d)] for d in densities]
        style = dict(marker="o", color=f"C{i}", ls="-" if name.startswith("routed") else "--", label=name)
        ax_mono.plot(densities, [row["monosemantic_fraction"] for row in rows], **style)
        baseline = [zero_output_loss(cfg["n_features"], cfg["importance_decay"], d) for d in densities]
        ax_loss.plot(densities, [row["loss"] / b for row, b in zip(rows, baseline)], **style)
    for ax in (ax_mono, ax_loss):
        ax.set_xscale("log")
        ax.set_xlabel("feature density 1 - S")
    ax_loss.set_yscale("log")
    ax_mono.set_ylabel("live units with monosemanticity ≥ 0.9")
    ax_loss.set_ylabel("loss / loss of predicting 0")
    ax_mono.set_title(f"y=|x|: n={cfg['n_features']}, {cfg['d_hidden']} active units, routed N={cfg['n_units']}")
    ax_loss.set_title("loss (lower is better)")
    ax_loss.legend(fontsize=7)
    return [_save(fig, out / "abs_headline.png")]


def plot_recovery(results: dict, out: Path) -> list[Path]:
    """recovery.png: MMCS, share recovered and normalised MSE per dictionary."""
    names = list(results["models"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    panels = [("mmcs_truth", "MMCS (over true features)"), ("recovered_fraction", "recovered at cos ≥ 0.9"),
              ("nmse", "normalised MSE")]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(names, [results["models"][n][key] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    return [_save(fig, out / "recovery.png")]

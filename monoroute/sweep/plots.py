"""The sweep's two pictures (PNG, matplotlib's Agg backend: no display needed).

1. val loss vs FLOPs/token: dense runs joined into the reference curve, routed runs as labelled points.
2. coverage vs val loss: dense neurons, routed units and the SAE on the dense model as points, each
   with its random-init floor as a hollow marker joined to it, so "above the floor" is visible.
"""
from __future__ import annotations

from pathlib import Path

from monoroute.fileio import atomic_write

LOSS_VS_FLOPS, COVERAGE_VS_LOSS = "loss_vs_flops.png", "coverage_vs_loss.png"
DENSE, ROUTED, SAE = ("#1f77b4", "o"), ("#d62728", "^"), ("#2ca02c", "s")


def is_dense(r: dict) -> bool:
    return r["n_units"] is None  # no routed layer (key_settings gives n_units only to routed models)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"), durable=False)
    plt.close(fig)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 5))


def _label(ax, x, y, text) -> None:
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


def plot_loss_vs_flops(rows: list[dict], path: Path) -> None:
    fig, ax = _figure()
    done = [r for r in rows if r["val_loss"] is not None and r["flops_per_token"]]
    dense = sorted((r for r in done if is_dense(r)), key=lambda r: r["flops_per_token"])
    routed = [r for r in done if not is_dense(r)]
    if dense:
        ax.plot([r["flops_per_token"] for r in dense], [r["val_loss"] for r in dense], "-", color=DENSE[0],
                marker=DENSE[1], label="dense FFN (reference curve)")
        for r in dense:
            _label(ax, r["flops_per_token"], r["val_loss"], r["run"])
    if routed:
        ax.scatter([r["flops_per_token"] for r in routed], [r["val_loss"] for r in routed], color=ROUTED[0],
                   marker=ROUTED[1], s=50, zorder=3, label="routed FFN")
        for r in routed:
            _label(ax, r["flops_per_token"], r["val_loss"], r["run"])
    if not done:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("FLOPs per token (forward)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs compute (lower left is better)")
    ax.grid(True, alpha=0.3, which="both")
    _save(fig, path)


def coverage_points(rows: list[dict]) -> list[tuple[str, str, float, float, float | None]]:
    """(kind, label, val loss, coverage, random-init coverage) for every analysed unit set. The SAE
    sits at its spliced loss (the model's loss when its reconstruction replaces the layer's output);
    its floor is the same SAE untrained (analyses from before matched floors: the dense model's neurons
    at init)."""
    points = []
    for r in rows:
        if r["coverage"] is None or r["val_loss"] is None:
            continue
        points.append(("dense" if is_dense(r) else "routed", r["run"], r["val_loss"], r["coverage"],
                       r["coverage_random_init"]))
        if r["sae_coverage"] is not None:
            loss = r["sae_spliced_val_loss"] if r["sae_spliced_val_loss"] is not None else r["val_loss"]
            floor = r.get("sae_coverage_sae_init")
            points.append(("sae", f"{r['run']} + SAE", loss, r["sae_coverage"],
                           floor if floor is not None else r["coverage_random_init"]))
    return points


def plot_coverage_vs_loss(rows: list[dict], path: Path) -> None:
    fig, ax = _figure()
    points = coverage_points(rows)
    styles = {"dense": (DENSE, "dense neurons"), "routed": (ROUTED, "routed units"), "sae": (SAE, "SAE on dense")}
    for kind, ((color, marker), name) in styles.items():
        mine = [p for p in points if p[0] == kind]
        if not mine:
            continue
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], color=color, marker=marker, s=55, zorder=3, label=name)
        for _, label, loss, cov, floor in mine:
            _label(ax, loss, cov, label)
            if floor is not None:
                ax.plot([loss, loss], [floor, cov], ":", color=color, lw=1, zorder=2)
                ax.scatter([loss], [floor], facecolors="none", edgecolors=color, marker=marker, s=55, zorder=3)
    if points:
        ax.scatter([], [], facecolors="none", edgecolors="gray", marker="o", label="hollow: random-init floor")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no analysed runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("validation loss (nats/token; SAE: with the SAE spliced in)")
    ax.set_ylabel("coverage (mean best-unit F1 over concepts)")
    ax.set_title("monosemanticity vs loss (upper left is better)")
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def plot_all(rows: list[dict], out: Path) -> list[Path]:
    paths = [Path(out) / LOSS_VS_FLOPS, Path(out) / COVERAGE_VS_LOSS]
    plot_loss_vs_flops(rows, paths[0])
    plot_coverage_vs_loss(rows, paths[1])
    return paths

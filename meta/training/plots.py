"""Learning-curve plots of a run (``curves.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(
    records: list[dict[str, Any]],
    path: Path,
    title: str = "",
    test: dict[str, Any] | None = None,
    reference: dict[str, Any] | None = None,
) -> None:
    """Training loss/accuracy and validation accuracy (with its 95% CI band) against the step, saved as a PNG;
    ``test`` (``step``, ``accuracy``, ``ci95``) adds the final test point with its CI, and ``reference``
    (``accuracy``, ``ci95``, ``source``) the paper's number as a line, when the protocol has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val" and r.get("accuracy") is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train query loss")
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val query loss")
    ax_loss.set_xlabel("meta-iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train accuracy (%)", alpha=0.6)
    steps, accuracy = [r["step"] for r in val], [r["accuracy"] for r in val]
    ax_acc.plot(steps, accuracy, "o-", label="val accuracy (%)")
    ci = [r.get("ci95") or 0.0 for r in val]
    ax_acc.fill_between(steps, [a - c for a, c in zip(accuracy, ci)], [a + c for a, c in zip(accuracy, ci)],
                        alpha=0.25, label="val 95% CI")
    if test is not None and test.get("accuracy") is not None:
        ax_acc.errorbar([test["step"]], [test["accuracy"]], yerr=[test.get("ci95") or 0.0], fmt="s", capsize=4,
                        color="black", label=f"test {test['accuracy']:.2f} ± {test.get('ci95') or 0.0:.2f}%")
    if reference is not None and reference.get("accuracy") is not None:
        paper = reference["accuracy"]
        ax_acc.axhline(paper, color="gray", linestyle="--", label=f"paper {paper}%")
        if reference.get("ci95") is not None:
            ax_acc.axhspan(paper - reference["ci95"], paper + reference["ci95"], color="gray", alpha=0.15)
    ax_acc.set_xlabel("meta-iteration")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

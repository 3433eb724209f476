"""Compare two training runs from their logs: writes plots, a text report and JSON.

    python examples/runs_compare.py [-o outputs/runs_example]

Writes two synthetic logs in the seed's text format (one with a malformed line), then calls
``compare_runs`` — the same as ``analog runs compare ttl/train.log ablation/train.log -o DIR``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from analog.runs import RunComparator, compare_runs


def write_log(path: Path, final_loss: float, steps: int = 20, tok_s: float = 20000.0) -> Path:
    """A log of ``steps`` training lines decaying towards ``final_loss``, validation every 5 steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["Starting training"]
    for i in range(1, steps + 1):
        loss = final_loss + 8.0 * math.exp(-i / 5)
        lines.append(
            f"[Epoch 1/1] Step {100 * i} | Tokens: {1.6 * i:.1f}M | LM Loss: {loss:.4f} | PPL: {math.exp(loss):.2f}"
            f" | LR: {3e-4 * min(1.0, i / 5):.2e} | GradNorm: {2.0 / math.sqrt(i):.2f} | Tok/s: {tok_s + 10 * i:.0f}"
        )
        if i % 5 == 0:
            val = loss + 0.15
            lines.append(f"[Validation] Loss: {val:.4f}, PPL: {math.exp(val):.2f}, Train/Val Gap: 0.95x")
    lines.append("[Epoch 1/1] Step 2100 | Tokens: 33.6M | LM Lo")  # a truncated last line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output-dir", default="outputs/runs_example")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    ttl = write_log(out / "logs" / "ttl" / "train.log", final_loss=3.2)
    ablation = write_log(out / "logs" / "ablation" / "train.log", final_loss=3.5, tok_s=23000.0)

    compare_runs({"TTL": ttl, "Ablation": ablation}, output_dir=out / "comparison", smoothing=0.6)

    comparator = RunComparator(align="tokens").add_run("TTL", ttl).add_run("Ablation", ablation)
    files = comparator.generate_comparison(out / "comparison_by_tokens")
    print(f"\nwrote {len(files)} files to {out / 'comparison'} and {out / 'comparison_by_tokens'}")


if __name__ == "__main__":
    main()

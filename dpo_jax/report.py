"""Training-diagnostics plots from a workdir's metrics.jsonl.

  python -m dpo_jax.report --workdir=runs/dpo [--output=runs/dpo/report]

writes one PNG per panel (train solid, eval dots): loss, implicit accuracy and
reward margin per timestep bucket (`dpo_jax.diagnostics`), MSE drift from the
reference, share of saturated pairs, grad norm (log scale). What healthy
curves look like: README, "Is training working?".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from dpo_jax.evaluate import read_metrics_jsonl

Series = dict[str, tuple[list[int], list[float]]]  # label -> (steps, values)

# Panel name -> metric-name patterns (after the train/ or eval/ prefix).
PANELS: dict[str, tuple[str, ...]] = {
  "loss": ("loss",),
  "implicit_acc": ("implicit_acc", r"implicit_acc_t\d+"),
  "reward_margin": ("reward_margin", r"reward_margin_t\d+"),
  "drift": ("drift_w", "drift_l", "drift_rel"),
  "saturated": ("saturated",),
  "grad_norm": ("grad_norm",),
}
PREFIXES = ("train", "eval")


def panel_series(curves: Mapping[str, Mapping[int, float]]) -> dict[str, Series]:
  """{panel: {"train/implicit_acc_t0": (steps, values), ...}} of the metrics present.

  Args:
    curves: `evaluate.read_metrics_jsonl` output, {key: {step: value}}.
  """
  out: dict[str, Series] = {}
  for panel, patterns in PANELS.items():
    series: Series = {}
    for key in sorted(curves):
      prefix, _, name = key.partition("/")
      if prefix in PREFIXES and any(re.fullmatch(p, name) for p in patterns):
        steps = sorted(curves[key])
        series[key] = (steps, [curves[key][s] for s in steps])
    if series:
      out[panel] = series
  return out


def plot_panels(panels: Mapping[str, Series], output: str) -> list[str]:
  """One PNG per panel in `output`; -> the files written."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(output, exist_ok=True)
  paths = []
  for panel, series in panels.items():
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, (label, (steps, values)) in enumerate(series.items()):
      style = "o--" if label.startswith("eval/") else "-"
      ax.plot(steps, values, style, color=f"C{i % 10}", label=label, markersize=3)
    if panel == "grad_norm":
      ax.set_yscale("log")
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    path = os.path.join(output, f"{panel}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def report(workdir: str, output: str | None = None) -> dict[str, Series]:
  """Plots `workdir/metrics.jsonl` into `output` (default `workdir/report`); -> the plotted series.

  Raises:
    FileNotFoundError: no metrics.jsonl in `workdir`.
    ValueError: it holds none of the plotted metrics.
  """
  panels = panel_series(read_metrics_jsonl(workdir))
  if not panels:
    raise ValueError(
      f"{workdir}/metrics.jsonl has none of the metrics {sorted(PANELS)} under train/ or eval/."
    )
  plot_panels(panels, output or os.path.join(workdir, "report"))
  return panels


def main(argv: Sequence[str]) -> None:
  from absl import flags

  del argv
  fv = flags.FLAGS
  output = fv.output or os.path.join(fv.workdir, "report")
  try:
    panels = report(fv.workdir, output)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None  # One line, exit status 1.
  print(f"Wrote {', '.join(f'{p}.png' for p in panels)} to {output}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "Training workdir holding metrics.jsonl.", required=True)
  flags.DEFINE_string("output", "", "Folder for the PNGs (default: WORKDIR/report).")
  app.run(main)

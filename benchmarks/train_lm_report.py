"""The tables, JSON and plot of ``benchmarks/train_lm.py``'s results: each
optimizer's ratios against the best AdamW run, time to that run's final loss.
"""

from __future__ import annotations

import json
import os

import numpy as np

# steps of the running mean of the train loss that the final loss, the time to
# target and the plot read
SMOOTH = 50


def time_to_target(result, target):
  if len(result["losses"]) < SMOOTH:
    return None, None
  smooth = np.convolve(result["losses"], np.ones(SMOOTH) / SMOOTH, mode="valid")
  elapsed = np.cumsum(result["step_s"])[SMOOTH - 1:]
  # the best AdamW run's own last window is its target, which the convolution
  # and the mean that gave it may round apart
  hit = np.nonzero(smooth <= target * (1 + 1e-6))[0]
  return (float(elapsed[hit[0]]), int(hit[0] + SMOOTH)) if len(hit) else (None,
                                                                          None)


def free_running_cell(result, adamw) -> str:
  if "ms_free_running" not in result:  # parts from before the measure existed
    return "n/a"
  ms, base = result["ms_free_running"], adamw.get("ms_free_running")
  return f"{ms:.1f}" + (f" ({ms / base:.2f}×)" if base else "")


def summarize(results, out):
  adamw = [r for r in results if r["name"].startswith("adamw")]
  if not adamw:
    print("The table's target and ratios are AdamW's: add 'adamw lr 1e-3' to "
          "--only (each optimizer's results are in OUT/parts).")
    return
  best = min(adamw, key=lambda r: r["final_loss"])
  target, (base_time,
           _) = best["final_loss"], time_to_target(best, best["final_loss"])
  rows = []
  print(
      f"\n{results[0]['params'] / 1e6:.1f} M params on {results[0]['device']}, "
      f"jax {results[0]['jax']}; "
      f"target = {best['name']}'s final loss {target:.4f}; the loop waited "
      f"every {results[0].get('sync_every', 1)} step(s)" +
      ("; batches prefetched to the device" if results[0].get("prefetch"
                                                             ) else "") +
      (f"; batch {results[0]['batch']} x {results[0]['context']} tokens"
       if "batch" in results[0] else "") +
      ("; compile s: the wall-clock of the programs compiled side by side"
       if results[0].get("compiled_concurrently") else ""))
  header = ("optimizer", "final loss", "held-out", "ms/step med / mean",
            "ms/step, loop not waiting", "time to target (× best adamw)",
            "state MiB", "peak GiB (× adamw)", "temp GiB",
            "compile s (× adamw)")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  ratio = lambda a, b: f"{a / b:.2f}×" if b else "n/a"
  for r in results:
    seconds, at_step = time_to_target(r, target)
    r["time_to_target_s"], r["time_to_target_ratio"] = seconds, (
        seconds / base_time if seconds and base_time else None)
    reach = ("not reached" if seconds is None else
             f"{seconds:.1f} s ({ratio(seconds, base_time)}, step {at_step})")
    cells = (
        r["name"], f"{r['final_loss']:.4f}", f"{r['held_out_loss']:.4f}",
        f"{r['ms_median']:.1f} / {r['ms_mean']:.1f}",
        free_running_cell(r, best), reach, f"{r['state_bytes'] / 2**20:.0f}" +
        (f" ({r['state_bytes_per_device'] / 2**20:.0f} per device)" if r.get(
            "devices", 1) > 1 else ""), f"{r['peak_bytes'] / 2**30:.2f} "
        f"({ratio(r['peak_bytes'], best['peak_bytes'])})",
        f"{r['temp_bytes'] / 2**30:.2f}",
        f"{r['compile_s']:.1f} ({ratio(r['compile_s'], best['compile_s'])})")
    rows.append(cells)
    print("| " + " | ".join(cells) + " |")
  rejected = {
      r["name"]: r["rejected_updates"]
      for r in results
      if r.get("rejected_updates")
  }
  print("\nRejected preconditioner / basis updates: " +
        (", ".join(f"{k}: {v}" for k, v in rejected.items()) or "none"))
  print_profiles(results)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"target": target, "results": results}, f)
  plot(results, out)


def print_profiles(results):
  profiled = [r for r in results if r.get("profile")]
  if not profiled:
    return
  parts = sorted(
      {p for r in profiled for p in r["profile"]["device_ms_by_part"]})
  header = ("optimizer", "span ms", "GPU idle ms", "kernels") + tuple(
      f"{p} ms" for p in parts)
  print(
      "\nPlain steps, from a profiler trace (ms per step; device time by part "
      "of the program)")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in profiled:
    p = r["profile"]
    cells = [
        r["name"], f"{p['span_ms']:.2f}", f"{p['idle_ms']:.2f}",
        f"{p['kernels_per_call']:.0f}"
    ]
    cells += [f"{p['device_ms_by_part'].get(part, 0.0):.2f}" for part in parts]
    print("| " + " | ".join(cells) + " |")
  for r in profiled:
    print(f"{r['name']}: longest idle gaps (ms, kernel before, kernel after):")
    for gap in r["profile"]["longest_gaps"]:
      print(f"  {gap[0]:.3f}  {gap[1]}  ->  {gap[2]}")


def plot(results, out):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    if len(r["losses"]) < SMOOTH:
      continue
    smooth = np.convolve(r["losses"], np.ones(SMOOTH) / SMOOTH, mode="valid")
    ax.plot(np.cumsum(r["step_s"])[SMOOTH - 1:], smooth, label=r["name"])
  ax.set(xlabel="wall-clock s (compile excluded)",
         ylabel=f"train loss ({SMOOTH}-step mean)", ylim=(None, 2.0))
  ax.legend()
  fig.savefig(
      os.path.join(out, "loss_vs_time.png"), dpi=120, bbox_inches="tight")

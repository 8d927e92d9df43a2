"""`tunesmith plan`: will a run fit, how long will it take, and what to change, before any step runs.

The room's parts, each below the next (imports point down the list):

  shapes.py      a model's config (local file/dir, alias, or a hub id's cached config.json) -> ModelShape
  params.py      exact parameter counts: the model built on the meta device, the method's own builder
                 applied (methods/), so the counts are those training would see, with no weights loaded
  workload.py    what a Config asks each device to hold and compute (method, dtypes, micro-batch tokens,
                 checkpointing, optimizer, strategy, world size, objective)
  devices.py     devices by name (a table of common GPUs) or by numbers, and this machine (probed)
  memory.py      bytes per device, component by component
  throughput.py  FLOPs per token (the formula the benchmarks use), rate x MFU -> step and total time
  advice.py      the verdict (fits, with its margin) and the cheapest changes that make a run fit
  report.py      Plan: the whole estimate, its text and JSON; make_plan() assembles it

Every estimate says where its numbers came from; runs record it beside what they measured
(manifest "plan" / "measured"), and benchmarks/plan_accuracy.py prints the error.
"""

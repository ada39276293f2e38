"""moesys.planner: `moesys-plan`, the cost model (moesys.parallel.cost_model) applied to a whole job.

    from moesys.planner import load_hardware, plan, workload_from_config
    result = plan(workload_from_config(train_cfg), load_hardware("h100_dgx", "bf16"), world=512)

workload.py (the job, from a moesys-train config), hardware.py (cluster presets), probe_host.py
(this machine), memory.py (per-rank memory), plan.py (the plan), report.py (tables, plot), cli.py.
"""
from .hardware import load_hardware, presets
from .plan import EPPlan, PlanResult, StepTime, plan, plan_ep
from .workload import PlanError, Workload, workload_from_config

__all__ = ["plan", "plan_ep", "PlanResult", "EPPlan", "StepTime", "load_hardware", "presets", "PlanError",
           "Workload", "workload_from_config"]

"""Text tables of a PlanResult (what `moesys-plan` prints) and the --plot figure."""
from __future__ import annotations

from moesys.parallel.cost_model import DISPATCHERS

from .memory import GIB
from .plan import EPPlan, PlanResult


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 10 else f"{s * 1e3:.0f}"


def _name(b) -> str:
    return f"{b.mode} c={b.degree}" if b.mode == "sharded_dp" else f"{b.mode}/{b.dispatcher} c={b.degree}"


def header(r: PlanResult) -> str:
    wl, hw = r.workload, r.hardware
    m = wl.moe
    T = wl.tokens_per_rank(r.world)
    lines = [
        f"moesys-plan: {r.world} x {hw.name}",
        f"  model: {wl.n_layers} layers ({wl.n_moe_layers} MoE), d={wl.d_model}, F={m.ffn_hidden_size}, "
        f"E={m.num_experts}, experts per token {wl.active_k:g}, {m.activation}, "
        f"capacity {'dropless' if m.capacity_factor is None else m.capacity_factor}; "
        f"{wl.dense_params / 1e6:.1f}M dense + {wl.n_moe_layers * wl.expert_params_per_layer / 1e6:.1f}M expert params",
        f"  batch: {wl.batch_size} x {wl.seq_len} tokens/step, grad_accum {wl.grad_accum}: {T:g} tokens per GPU per "
        f"micro-step; {wl.precision}, engine {wl.engine}"
        + (f" (ZeRO-{wl.zero_stage})" if wl.engine == "deepspeed" else "")
        + f"; routing skew {wl.skew:g} (hottest expert / mean load)",
        f"  config: parallel.dispatcher={wl.dispatcher}, parallel.mode={wl.mode or 'auto'}, "
        f"parallel.overlap={wl.overlap or 'auto'}",
    ]
    return "\n".join(lines)


def ep_table(p: EPPlan, hw_memory: float) -> str:
    degrees = sorted({b.degree for b in p.ranked})
    rows = {}
    order = {d: i for i, d in enumerate(("-",) + DISPATCHERS)}
    for b in sorted(p.ranked, key=lambda b: (b.mode != "ep", order[b.dispatcher], b.degree)):
        rows.setdefault((b.mode, b.dispatcher), {})[b.degree] = b
    out = [f"\nEP={p.ep} (x{p.edp} expert-data-parallel): one MoE layer, fwd+bwd ms, busiest rank "
           f"({p.stats.max_rank_rows} rows on it in ep mode, {p.stats.max_local_rows} of its own)"]
    w = max(13, *(len(d) + 2 for _, d in rows))  # the dispatcher column fits the longest name
    out.append(f"  {'mode':<11}{'dispatcher':<{w}}" + "".join(f"{'c=' + str(c):>9}" for c in degrees)
               + f"{'MB moved/fwd':>14}")
    for (mode, disp), by_c in rows.items():
        cells = "".join(f"{_ms(by_c[c].total):>9}" if c in by_c else f"{'':>9}" for c in degrees)
        mb = by_c[min(by_c)].bytes_fwd / 1e6
        out.append(f"  {mode:<11}{disp:<{w}}{cells}{mb:14.1f}")
    out.append(f"  runtime's choice: {_name(p.runtime)} {_ms(p.runtime.total)} ms "
               f"({p.speedup('runtime'):.2f}x the static ep/alltoallv c=1 per layer, "
               f"{p.speedup('runtime', 'step'):.2f}x per step)")
    out.append(f"  best of all: {_name(p.best)} {_ms(p.best.total)} ms ({p.speedup('best'):.2f}x per layer, "
               f"{p.speedup('best', 'step'):.2f}x per step)")
    for mode, m in p.memory.items():
        verdict = "fits" if p.fits[mode] else "DOES NOT FIT"
        out.append(f"  memory per GPU, {mode}: {m.gib()} (of {hw_memory / GIB:.0f} GiB): {verdict}")
    s = p.step_best
    hidden = f" exposed of {s.grad_sync_full:.3f}" if s.grad_sync < s.grad_sync_full else ""
    out.append(f"  step (best): {s.total:.3f} s = MoE layers {s.moe:.3f} + dense {s.dense:.3f} + grad sync "
               f"{s.grad_sync:.3f}{hidden}")
    return "\n".join(out)


def summary(r: PlanResult) -> str:
    out = ["\nSummary (per EP size: the best layout that fits)",
           f"  {'ep':>5} {'layout':<28}{'layer ms':>9}{'step s':>9}{'vs static':>10}{'memory GiB':>11}  fits"]
    for p in r.plans:
        mem = p.memory[p.best.mode].total / GIB
        out.append(f"  {p.ep:>5} {_name(p.best):<28}{_ms(p.best.total):>9}{p.step_best.total:9.3f}"
                   f"{p.speedup('best', 'step'):9.2f}x{mem:11.1f}  {'yes' if p.fits[p.best.mode] else 'NO'}")
    rec = r.recommended
    if rec is None:
        out.append("no layout fits in memory")
    else:
        b = rec.best
        pins = f"parallel.ep={rec.ep}" + (f" parallel.dispatcher={b.dispatcher}" if b.mode == "ep" else "")
        out.append(f"recommended: {pins}  (predicted {_name(b)}, {rec.step_best.total:.3f} s a step, "
                   f"{rec.speedup('best', 'step'):.2f}x the static flat all-to-all without overlap; the runtime "
                   f"picks mode and overlap itself)")
    return "\n".join(out)


def render(r: PlanResult) -> str:
    return "\n".join([header(r), *(ep_table(p, r.hardware.memory_bytes) for p in r.plans), summary(r)])


def plot_scaling(points: dict, path: str, title: str) -> None:
    """points: dispatcher (or label) -> [(gpus, step seconds)]; a log-log figure written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in points.items():
        xs, ys = zip(*pts)
        style = "--" if label.startswith("static") else "-"
        ax.plot(xs, ys, style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    gpus = sorted({x for pts in points.values() for x, _ in pts})
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted step time (s, log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCALING_GPUS = (16, 32, 64, 128, 256, 512, 1024, 2048)
__all__ = ["render", "plot_scaling", "SCALING_GPUS", "DISPATCHERS"]

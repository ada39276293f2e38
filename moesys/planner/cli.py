"""`moesys-plan`: which EP size, dispatcher and overlap, how long a step, on a cluster you may not have.

    moesys-plan --cluster a100_dgx --gpus 256 preset=gpu_small trainer.batch_size=2048
    moesys-plan --cluster h100_dgx --gpus 1024 --tokens-per-gpu 8192 model.d_model=2048 moe.num_experts=128
    moesys-plan --cluster h200_dgx --gpus 512 --config outputs/2026-12-01/10-00-00/.hydra/config.yaml
    moesys-plan --cluster my_cluster.yaml --gpus 64 --ep 8,16 --plot scaling.png preset=gpu_small
    moesys-plan --cluster this --gpus 2 preset=tiny      # probes this machine on 2 gloo ranks

Arguments after the options are moesys-train's Hydra overrides (the same presets and fields), so a
training config and its plan are one thing. Prints, per EP size, every mode x dispatcher x overlap
degree's predicted fwd+bwd time of one MoE layer, the runtime's choice, per-GPU memory and the
step time, then the recommended layout. Bad input is one line naming the field, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from moesys.configs.schema import register
from moesys.parallel.cost_model import DEGREES, DISPATCHERS

from .hardware import THIS, load_hardware, presets
from .placement import placement_gain, render_gain
from .plan import plan, plan_ep
from .probe_host import probe_this_machine
from .report import SCALING_GPUS, plot_scaling, render
from .workload import PlanError, workload_from_config


def compose_train_config(overrides: list, config_path: Optional[str] = None):
    """moesys-train's TrainConfig from Hydra overrides (and a saved config file as the base)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf


    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="moesys.configs", version_base="1.3"):
            dcfg = compose(config_name="train", overrides=overrides)
        if config_path is not None:
            if not os.path.isfile(config_path):
                raise PlanError(f"--config={config_path!r}: no such file")
            keyed = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0] and not o.startswith("+")]
            dcfg = OmegaConf.merge(dcfg, OmegaConf.load(config_path), OmegaConf.from_dotlist(keyed))
        return OmegaConf.to_object(dcfg)
    except PlanError:
        raise
    except Exception as e:  # Hydra/OmegaConf: unknown key, wrong type, unknown preset ...
        raise PlanError(f"config: {_one_line(e)}") from None
    finally:
        GlobalHydra.instance().clear()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list:
    return [x for x in text.split(",") if x]


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line composition errors as one line that still names the field and the choices."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    out = lines[0]
    if e.__cause__ is not None and str(e.__cause__).strip():
        out = out.rstrip(".") + f": {str(e.__cause__).strip().splitlines()[0]}"
    if any(x.startswith("Available options") for x in lines):
        i = next(i for i, x in enumerate(lines) if x.startswith("Available options"))
        opts = [x for x in lines[i + 1:] if not x.startswith(("Config search path", "provider="))]
        out += f" (available: {', '.join(opts)})"
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="moesys-plan", description=__doc__.splitlines()[0].replace("`", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cluster presets: " + ", ".join(presets()))
    ap.add_argument("--cluster", default="a100_dgx", help="a preset, a YAML file of the same fields, or 'this' (default: a100_dgx)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="world size (default: one node of the preset; parallel.simulate_ranks for 'this')")
    ap.add_argument("--ep", type=_int_list, default=None, help="EP sizes to price, e.g. 8,16 (default: every valid one)")
    ap.add_argument("--tokens-per-gpu", type=int, default=None,
                    help="set trainer.batch_size so each GPU runs this many tokens per micro-step")
    ap.add_argument("--skew", type=float, default=1.25, help="hottest expert's load / mean load (default 1.25)")
    ap.add_argument("--active-k", type=float, default=None,
                    help="mean experts per token (default: moe.top_k; 1 for switch; a dense-to-sparse gate's value)")
    ap.add_argument("--dispatchers", type=_str_list, default=list(DISPATCHERS),
                    help=f"dispatchers to rank (default: {','.join(DISPATCHERS)})")
    ap.add_argument("--degrees", type=_int_list, default=list(DEGREES),
                    help=f"overlap degrees to rank (default: {','.join(map(str, DEGREES))})")
    ap.add_argument("--config", default=None, help="a saved moesys-train config (YAML) as the base")
    ap.add_argument("--plot", default=None, help="write predicted step time vs GPUs (16..2048) per dispatcher here")
    ap.add_argument("--threads", type=int, default=None, help="'this': intra-op threads per rank")
    ap.add_argument("overrides", nargs="*", help="moesys-train overrides, e.g. preset=gpu_small moe.num_experts=64")
    return ap


def _hardware_for(args, cfg, wl, world: int):
    if args.cluster != THIS:
        return load_hardware(args.cluster, wl.precision)
    if args.plot:
        raise PlanError("--plot needs a cluster preset or YAML: --cluster=this can only probe this machine's ranks")
    if world > (os.cpu_count() or 1) * 8:
        raise PlanError(f"--gpus {world}: --cluster=this probes {world} local ranks; this machine has "
                        f"{os.cpu_count()} cores")

    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    cache = {}

    def probed(ep: int):
        if ep not in cache:
            cache[ep] = probe_this_machine(wl.moe, world, round(wl.tokens_per_rank(world)), threads=threads, ep=ep)
        return cache[ep]

    return probed


def scaling_points(wl, hw, world: int, rec) -> dict:
    """Weak scaling for --plot: tokens and experts per GPU of the recommended layout held, one ep
    group over all GPUs (Tutel's scaling runs); per dispatcher its best mode/degree, and the static
    baseline."""

    points = {}
    for gpus in SCALING_GPUS:
        wl_g = wl.scaled(gpus, world, gpus, rec.ep)
        p = plan_ep(wl_g, hw, gpus, gpus)
        for d in DISPATCHERS:
            b = next(x for x in p.ranked if x.dispatcher == d)
            points.setdefault(d, []).append((gpus, p.step_best.total - p.step_best.moe
                                             + wl.grad_accum * wl.n_moe_layers * b.total))
        sdp = next(x for x in p.ranked if x.mode == "sharded_dp")
        points.setdefault("sharded_dp", []).append((gpus, p.step_best.total - p.step_best.moe
                                                    + wl.grad_accum * wl.n_moe_layers * sdp.total))
        points.setdefault("static ep/alltoallv c=1", []).append((gpus, p.step_baseline.total))
    return points


def run(argv=None) -> str:
    """Parse, plan, render; returns the text (raises PlanError on bad input)."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    cfg = compose_train_config(overrides, args.config)
    world = args.gpus
    if world is None:
        world = cfg.parallel.simulate_ranks if args.cluster == THIS else load_hardware(
            args.cluster, cfg.trainer.precision).gpus_per_node
    if world < 1:
        raise PlanError(f"--gpus must be >= 1, got {world}")
    if args.tokens_per_gpu is not None:
        if args.tokens_per_gpu < 1:
            raise PlanError(f"--tokens-per-gpu must be >= 1, got {args.tokens_per_gpu}")
        seqs = args.tokens_per_gpu * world * cfg.trainer.grad_accum
        if seqs % cfg.model.seq_len:
            raise PlanError(f"--tokens-per-gpu {args.tokens_per_gpu}: x {world} GPUs x trainer.grad_accum "
                            f"({cfg.trainer.grad_accum}) must be a multiple of model.seq_len ({cfg.model.seq_len})")
        cfg.trainer.batch_size = seqs // cfg.model.seq_len
    wl = workload_from_config(cfg, skew=args.skew, active_k=args.active_k)
    hw = _hardware_for(args, cfg, wl, world)
    result = plan(wl, hw, world, eps=args.ep, dispatchers=args.dispatchers, degrees=args.degrees)
    text = render(result)
    rec = result.recommended
    if rec is not None:  # what parallel.placement=auto would gain at the recommended layout for --skew
        text += "\n" + render_gain(placement_gain(wl, hw(rec.ep) if callable(hw) else hw, world, rec.ep), wl.skew)
    if args.plot:
        pts = scaling_points(wl, hw, world, rec)
        title = (f"{hw.name}\nweak scaling: {wl.tokens_per_rank(world):g} tokens and "
                 f"{wl.moe.num_experts / rec.ep:g} expert(s) per GPU, one ep group over all GPUs")
        plot_scaling(pts, args.plot, title)
        text += f"\nplot: {args.plot}"
    return text


def main(argv=None) -> None:
    try:
        print(run(argv))
    except PlanError as e:
        print(f"moesys-plan: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

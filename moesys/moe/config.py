"""MoEConfig: the typed, validated configuration of one MoE layer.

Every field is checked at construction; errors name the field and the offending numbers so a
bad config fails on every rank before any collective is issued.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

ROUTERS = ("topk", "switch", "sigmoid_bias", "expert_choice", "dts", "act_dts")
ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
DROP_POLICIES = ("position", "bpr", "probs", "random")
AUX_LOSSES = ("switch", "gshard", "seq", "global_batch", "none")
GROUP_ROUTERS = ("topk", "switch", "sigmoid_bias")  # routers that take num_groups / topk_groups
GLOBAL_BATCH_ROUTERS = ("topk", "switch", "sigmoid_bias")  # routers whose Switch loss can pool counts
KERNEL_BACKENDS = ("auto", "torch", "triton", "triton_persistent", "grouped_mm")
TAU_SCHEDULES = ("linear", "exponential")
GATE_ACTIVATIONS = ("sigmoid", "tanh")


@dataclass
class MoEConfig:
    """Configuration of one MoE layer.

    Shapes: D = hidden_size, F = ffn_hidden_size, E = num_experts, K = top_k.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    # --- routing -------------------------------------------------------------------------------
    router: str = "topk"  # one of ROUTERS
    # renormalise the k weights to sum to 1 (Mixtral/GShard); None: decide by K (True for K > 1,
    # False for K = 1, where one renormalised weight is always 1 and the router would get no
    # gradient from the task loss). Read it through `renormalize_topk`.
    normalize_topk: Optional[bool] = None
    jitter_eps: float = 0.0  # multiply router input by U(1-eps, 1+eps); training only
    bias_update_rate: float = 1e-3  # gamma of the aux-loss-free (sigmoid_bias) update
    allow_noncausal: bool = False  # expert_choice looks at the whole batch: opt in for decoders
    # group-limited routing (DeepSeek-V3; Megatron moe_router_num_groups / moe_router_group_topk):
    # experts e in [g*E/G, (g+1)*E/G) form group g; each token keeps the topk_groups groups with
    # the highest sum of their top-2 routing scores (top-1 when a group has one expert), then its
    # top-k inside them. None: no group limit. Groups aligned with EP ranks (G a multiple of ep)
    # send each token to at most topk_groups ranks. Routers: topk, switch, sigmoid_bias.
    num_groups: Optional[int] = None
    topk_groups: Optional[int] = None
    # --- experts -------------------------------------------------------------------------------
    activation: str = "gelu"  # one of ACTIVATIONS; swiglu adds w3
    init_std: float = 0.02
    # shared experts (DeepSeek-MoE, Qwen2-MoE): S dense FFNs every token goes through, added to the
    # routed output; replicated under expert parallelism (dense parameters)
    num_shared_experts: int = 0
    shared_ffn_hidden_size: Optional[int] = None  # Fs of each shared expert; None: ffn_hidden_size
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(x . g), one g [D] per layer
    # DeepSeek-V3 (2.5 in its checkpoints): the routed experts' combined output is multiplied by this
    # factor, before the shared experts are added; forward and gradient exactly (unlike folding it into w2)
    routed_scaling_factor: float = 1.0
    # recompute the expert FFNs' [N, F] intermediates in backward instead of keeping them from the
    # forward (routed and shared experts): less activation memory, one more first-layer GEMM per step
    recompute: bool = False
    # --- capacity ------------------------------------------------------------------------------
    capacity_factor: Optional[float] = None  # None = dropless
    min_capacity: int = 4
    drop_policy: str = "position"  # one of DROP_POLICIES (moesys/moe/routing_plan.py); "bpr": Tutel's BPR
    # DeepSpeed's top-2 gate: after drops, divide each token's kept weights by their sum (a token
    # that lost one of two routes puts weight 1 on the survivor); needs weights that sum to 1
    renormalize_after_drop: bool = False
    # --- balancing losses ----------------------------------------------------------------------
    # switch: Megatron's form over all K choices; gshard: GShard/Tutel/DeepSpeed, first choices only;
    # global_batch: switch with the routes per expert summed over the layer's balance group (the
    # trainer's dp group: the whole global batch) before the loss (Qwen, Qiu et al. 2025)
    aux_loss: str = "switch"  # one of AUX_LOSSES
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    # --- dense-to-sparse gates (router="dts" / "act_dts"; EvoMoE) -------------------------------
    dts_threshold: float = 1e-3  # route to every expert whose gate value exceeds this
    tau_max: float = 2.0
    tau_min: float = 0.3
    gate_activation: str = "sigmoid"  # act_dts: sigma in softmax(sigma(Wr x)/tau + b)
    dts_balance_coef: float = 1e-2  # weight of EvoMoE's E^2 * mean_e(me_e * ce_e) loss
    # --- kernels -------------------------------------------------------------------------------
    # "auto": CUDA: the sync-free grouped_mm path where torch._grouped_mm runs, else Triton; torch elsewhere.
    # "triton_persistent": like "triton", with grouped GEMMs through the persistent (TMA on sm90+) kernel.
    # "grouped_mm": the sync-free path (static shapes, no host reads; torch.compile fullgraph, CUDA
    # graphs) on any device; needs hidden/ffn sizes that are multiples of 16 bytes / element size.
    # The dense-to-sparse gates (dts, act_dts) are its documented exception: their number of routes
    # depends on the data, so they keep the host plan (experts still on torch._grouped_mm).
    kernel_backend: str = "auto"

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {v!r}")

        def choice(name: str, options: tuple) -> None:
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"MoEConfig.{name}={v!r} is not one of {list(options)}")

        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            positive_int(name)
        choice("router", ROUTERS)
        choice("activation", ACTIVATIONS)
        choice("drop_policy", DROP_POLICIES)
        choice("aux_loss", AUX_LOSSES)
        choice("kernel_backend", KERNEL_BACKENDS)
        choice("gate_activation", GATE_ACTIVATIONS)
        if self.normalize_topk is not None and not isinstance(self.normalize_topk, bool):
            raise ValueError(
                f"MoEConfig.normalize_topk must be True, False or None (decide by top_k), got {self.normalize_topk!r}"
            )
        if self.normalize_topk is True and self.top_k == 1 and self.router in ("topk", "sigmoid_bias"):
            warnings.warn(
                f"MoEConfig.normalize_topk=True with top_k=1 (router={self.router!r}): every combine weight is "
                "then 1, so the task loss gives the router no gradient; leave normalize_topk unset (None: "
                "False for K=1) to scale each output by its routing probability",
                UserWarning,
                stacklevel=3,
            )
        if not isinstance(self.renormalize_after_drop, bool):
            raise ValueError(f"MoEConfig.renormalize_after_drop must be True or False, got {self.renormalize_after_drop!r}")
        if self.renormalize_after_drop and not (self.router in ("topk", "sigmoid_bias") and self.renormalize_topk):
            raise ValueError(
                "MoEConfig.renormalize_after_drop=True rescales each token's top-k weights, which sum to 1, over "
                "the routes it keeps: it needs router 'topk' or 'sigmoid_bias' with top_k > 1 and normalize_topk "
                f"not False; got router={self.router!r}, top_k={self.top_k}, normalize_topk={self.normalize_topk!r}"
            )
        self._check_groups()
        if self.aux_loss == "global_batch" and self.router not in GLOBAL_BATCH_ROUTERS:
            raise ValueError(
                f"MoEConfig.aux_loss='global_batch' pools the Switch loss's counts; router={self.router!r} has no "
                f"Switch loss (routers that do: {list(GLOBAL_BATCH_ROUTERS)})"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"MoEConfig.router='switch' is top-1; got top_k={self.top_k}")
        # the factor's exact decimal ratio, computed here, eagerly (and again when the field is set:
        # __setattr__): under torch.compile a second compile of a layer with another factor makes the
        # float symbolic, and Fraction cannot trace
        self.__dict__["_cf_ratio"] = _checked_ratio(self.capacity_factor)
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"MoEConfig.min_capacity must be an integer >= 0, got {self.min_capacity!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter_eps", "bias_update_rate", "dts_balance_coef"):
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {v}")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not 0 < rsf < math.inf:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be a finite number > 0, got {rsf!r}")
        if self.jitter_eps >= 1:
            raise ValueError(f"MoEConfig.jitter_eps must be < 1, got {self.jitter_eps}")
        if not 0 < self.dts_threshold < 1:
            raise ValueError(f"MoEConfig.dts_threshold must be in (0, 1), got {self.dts_threshold}")
        if not 0 < self.tau_min <= self.tau_max:
            raise ValueError(
                f"MoEConfig.tau_min ({self.tau_min}) and tau_max ({self.tau_max}) must satisfy 0 < tau_min <= tau_max"
            )
        if not self.init_std > 0:
            raise ValueError(f"MoEConfig.init_std must be > 0, got {self.init_std}")
        S = self.num_shared_experts
        if isinstance(S, bool) or not isinstance(S, int) or S < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be an integer >= 0, got {S!r}")
        fs = self.shared_ffn_hidden_size
        if fs is not None and (isinstance(fs, bool) or not isinstance(fs, int) or fs <= 0):
            raise ValueError(f"MoEConfig.shared_ffn_hidden_size must be a positive integer or None "
                             f"(= MoEConfig.ffn_hidden_size), got {fs!r}")
        for name in ("shared_expert_gate", "recompute"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if S == 0 and (fs is not None or self.shared_expert_gate):
            raise ValueError(
                f"MoEConfig.num_shared_experts is 0 but MoEConfig.shared_ffn_hidden_size={fs!r} / "
                f"MoEConfig.shared_expert_gate={self.shared_expert_gate!r} is set: shared experts need "
                "MoEConfig.num_shared_experts >= 1"
            )
        if self.kernel_backend == "grouped_mm":
            sizes = [("hidden_size", self.hidden_size), ("ffn_hidden_size", self.ffn_hidden_size)]
            if S:
                sizes.append(("shared_ffn_hidden_size", self.shared_ffn))
            bad = [f"MoEConfig.{n} ({v})" for n, v in sizes if v % 4]
            if bad:
                raise ValueError(
                    f"MoEConfig.kernel_backend='grouped_mm' needs {' and '.join(bad)} divisible by 4 "
                    "(torch._grouped_mm rows are 16-byte aligned: 4 fp32 or 8 bf16 elements); pad them or use "
                    "kernel_backend='torch'"
                )

    def _check_groups(self) -> None:
        G, TG, E, K = self.num_groups, self.topk_groups, self.num_experts, self.top_k
        for name, v in (("num_groups", G), ("topk_groups", TG)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"MoEConfig.{name} must be a positive integer or None (no group limit), got {v!r}")
        if G is None and TG is None:
            return
        if G is None or TG is None:
            raise ValueError(
                f"MoEConfig.num_groups ({G}) and MoEConfig.topk_groups ({TG}) go together: set both for group-limited "
                "routing, or neither"
            )
        if self.router not in GROUP_ROUTERS:
            raise ValueError(
                f"MoEConfig.num_groups={G}: group-limited routing needs router in {list(GROUP_ROUTERS)}, "
                f"got router={self.router!r}"
            )
        if E % G != 0:
            raise ValueError(f"MoEConfig.num_groups ({G}) must divide MoEConfig.num_experts ({E})")
        if TG > G:
            raise ValueError(f"MoEConfig.topk_groups ({TG}) must be <= MoEConfig.num_groups ({G})")
        if K > TG * (E // G):
            raise ValueError(
                f"MoEConfig.top_k ({K}) must be <= MoEConfig.topk_groups ({TG}) x experts per group ({E // G} = "
                f"num_experts {E} / num_groups {G}) = {TG * (E // G)}: the kept groups hold too few experts"
            )

    # ------------------------------------------------------------------------------------------
    @property
    def group_limited(self) -> bool:
        """Whether routing is restricted to topk_groups of num_groups expert groups."""
        return self.num_groups is not None and self.topk_groups < self.num_groups

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def shared_ffn(self) -> int:
        """Fs, the hidden width of each shared expert (shared_ffn_hidden_size, else ffn_hidden_size)."""
        return self.shared_ffn_hidden_size if self.shared_ffn_hidden_size is not None else self.ffn_hidden_size

    @property
    def variable_k(self) -> bool:
        """Routers whose number of experts per token varies (dense-to-sparse gates)."""
        return self.router in ("dts", "act_dts")

    @property
    def renormalize_topk(self) -> bool:
        """Whether the top-k routers renormalise their K weights to sum to 1: `normalize_topk`, or
        when it is None, K > 1. router="switch" never does (its output is scaled by p_max)."""
        if self.router == "switch":
            return False
        if self.normalize_topk is None:
            return self.top_k > 1
        return self.normalize_topk

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def structural_hash(self) -> str:
        """Hash of every field that must agree across expert-parallel ranks.

        Compared across ranks before the first all-to-all so a mismatched config is an error,
        not a hang or silent garbage.
        """
        fields = self.to_dict()
        fields["normalize_topk"] = self.renormalize_topk  # None and its resolved value route alike
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Per-expert capacity C = max(min_capacity, ceil(cf * K * T / E)); None when dropless."""
        if self.capacity_factor is None:
            return None
        return max(self.min_capacity, exact_capacity(self.capacity_factor, self.top_k, num_tokens, self.num_experts,
                                                     self.capacity_ratio()))

    def __setattr__(self, name: str, value) -> None:
        if name == "capacity_factor" and "_cf_ratio" in self.__dict__:  # set after __post_init__
            self.__dict__["_cf_ratio"] = _checked_ratio(value)  # the ratio follows the field (checked first)
        super().__setattr__(name, value)

    def capacity_ratio(self) -> tuple:
        """(numerator, denominator) of capacity_factor as the decimal written (1.1 -> (11, 10)),
        computed when the field was set (__post_init__, __setattr__), so a compiled graph reads two
        ints and never traces Fraction."""
        return self.__dict__["_cf_ratio"][1:]


def exact_capacity(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int,
                   ratio: Optional[tuple] = None) -> int:
    """ceil(cf * K * T / E) in exact arithmetic, cf taken as the decimal it is written as.

    In floats 1.1 * 400 / 4 is 110.00000000000001, whose ceiling is 111; the exact value is 110.
    `Fraction(str(cf))` reads the shortest decimal that round-trips the float (1.1 -> 11/10), which
    is the number the user wrote in the config. `ratio`: that (numerator, denominator), already known."""
    num, den = ratio if ratio is not None else _decimal_ratio(capacity_factor)
    return -(-(num * top_k * num_tokens) // (den * num_experts))  # integer ceil: traceable with a symbolic T


def _checked_ratio(cf) -> Optional[tuple]:
    """(cf, numerator, denominator) of a valid capacity factor, None for None (dropless)."""
    if cf is None:
        return None
    if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 < cf < math.inf:
        raise ValueError(f"MoEConfig.capacity_factor must be a finite number > 0 or None (dropless), got {cf!r}")
    return (cf, *_decimal_ratio(cf))


def _decimal_ratio(x: float) -> tuple:
    """(numerator, denominator) of the decimal `x` is written as. Never called in traced code
    (torch.compile cannot trace Fraction): MoEConfig computes it when capacity_factor is set."""
    f = Fraction(str(x))
    return f.numerator, f.denominator

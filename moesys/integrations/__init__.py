"""Integrations with external trainers.

    from moesys.integrations.deepspeed import build_engine          # ZeRO-1/2 engine (trainer.engine=deepspeed)
    from moesys.integrations.megatron import moesys_gpt_layer_spec  # moesys MoE as Megatron-core's MLP

The submodules import DeepSpeed / Megatron-core only when used, so `import moesys.integrations`
needs neither.
"""
__all__ = ["deepspeed", "megatron"]

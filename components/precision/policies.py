"""Precision policies: fp32, bf16 autocast, bf16 parameters with fp32 masters, fp16 autocast
with dynamic loss scaling, fp8."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from tessera.components.interfaces import ElementBytes, PrecisionPolicy
from tessera.components.precision.loss_scale import LossScale
from tessera.components.precision.master_weights import MasterWeights
from tessera.registry.kinds import PRECISION


@PRECISION.register("fp32")
class FP32(PrecisionPolicy):
    """Everything in fp32."""

    compute_dtype = torch.float32

    def autocast(self, device_type: str) -> Any:
        return nullcontext()


@PRECISION.register("bf16")
class BF16Autocast(PrecisionPolicy):
    """Matmuls in bf16 under autocast; parameters, gradients and optimizer state stay fp32
    (the master weights). No loss scaling: bf16 has fp32's exponent range."""

    compute_dtype = torch.bfloat16

    def autocast(self, device_type: str) -> Any:
        return torch.autocast(device_type, dtype=torch.bfloat16)


@PRECISION.register("bf16_params")
class BF16Params(PrecisionPolicy):
    """Parameters and gradients stored in bf16 (half the weight and gradient memory, no
    per-step weight casts); the optimizer updates an fp32 master copy of every parameter
    with fp32 state (`MasterWeights`), so updates below bf16's resolution are not lost.
    Floating buffers (e.g. the MoE router's balancing bias) stay fp32. Forward passes run
    under bf16 autocast, so the ops autocast keeps in fp32 (softmax, losses) stay there.
    Gradients are accumulated across micro-batches in bf16. Under `parallel=@fsdp` this is
    FSDP's mixed precision instead: fp32 sharded masters, bf16 gathered copies."""

    compute_dtype = torch.bfloat16
    param_dtype = torch.bfloat16

    def autocast(self, device_type: str) -> Any:
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        # FSDP casts its gathered copies (see the fsdp plan); under a pipeline the FSDP roots
        # are the stages, below the model
        if any(isinstance(module, FSDPModule) for module in model.modules()):
            return model
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return MasterWeights(optimizer)

    def element_bytes(self, device_type: str) -> ElementBytes:
        """bf16 parameters and gradients, fp32 masters and optimizer state, bf16 activations."""
        return ElementBytes(parameter=2, gradient=2, optimizer_state=4, master=4, activation=2)


@PRECISION.register("fp16")
class FP16Autocast(PrecisionPolicy):
    """Matmuls in fp16 under autocast with dynamic loss scaling (`loss_scale`): a step whose
    gradients overflow is skipped and counted, and the scale backs off."""

    compute_dtype = torch.float16

    def __init__(self, *, loss_scale: LossScale | None = None):
        self.loss_scale = loss_scale or LossScale()

    def autocast(self, device_type: str) -> Any:
        return torch.autocast(device_type, dtype=torch.float16)

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler:
        return self.loss_scale.scaler(device_type)


@PRECISION.register("fp8")
class FP8(PrecisionPolicy):
    """fp8 (e4m3) matmuls in the blocks' linear layers through torchao's float8 training
    conversion (not the output head or the MoE router), bf16 autocast for the rest. Needs a
    GPU with fp8 tensor cores; `emulate=True` runs the same numerics in software anywhere
    (slow, for testing recipes)."""

    compute_dtype = torch.bfloat16

    def __init__(self, *, emulate: bool = False):
        self.emulate = emulate

    def autocast(self, device_type: str) -> Any:
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        if not self.emulate and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
            raise RuntimeError(f"fp8 training needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9); "
                               f"this run is on {device.type}. Use precision=@bf16, or precision=@fp8(emulate=True) "
                               f"to emulate fp8 numerics in software")
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError as err:
            raise ImportError("fp8 training uses torchao: pip install torchao") from err
        return convert_to_float8_training(model, config=Float8LinearConfig(emulate=self.emulate),
                                          module_filter_fn=_fp8_eligible)

    def element_bytes(self, device_type: str) -> ElementBytes:
        """torchao's float8 training keeps fp32 weights, gradients and state; the linear layers
        save their inputs in bf16 or fp8, counted as bf16 (the upper bound)."""
        return ElementBytes(parameter=4, gradient=4, optimizer_state=4, activation=2)


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Which linear layers compute in fp8: those inside the blocks, as in DeepSeek-V3's fp8
    framework, which keeps the output head and the MoE gating in higher precision; fp8 GEMMs
    also need both dimensions to be multiples of 16."""
    if fqn == "head" or "router" in fqn.split("."):
        return False
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

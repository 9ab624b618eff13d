"""The DeepSpeed config a spec asks for. Values the HF Trainer also sets are "auto", so the
two never disagree (batch sizes, accumulation, clipping, precision)."""

from __future__ import annotations

from ftservice.config import DeepSpeedSpec, JobSpec


def deepspeed_config(spec: JobSpec) -> dict:
    """Full fine-tuning runs under DeepSpeed; without a deepspeed section, ZeRO-3."""
    ds = spec.scaling.deepspeed or DeepSpeedSpec()
    zero: dict = {"stage": ds.stage, "overlap_comm": False, "contiguous_gradients": True}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
        if ds.offload_optimizer == "nvme":
            zero["offload_optimizer"]["nvme_path"] = ds.nvme_path
    if ds.stage == 3:
        # gather the sharded 16-bit weights into one state dict on save, so the artifact
        # loads with from_pretrained and no DeepSpeed
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params != "none":
            zero["offload_param"] = {"device": ds.offload_params, "pin_memory": True}
            if ds.offload_params == "nvme":
                zero["offload_param"]["nvme_path"] = ds.nvme_path
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }

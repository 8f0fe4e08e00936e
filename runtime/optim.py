"""The optimizers the plan can name, built the way transformers' Trainer builds them for its `optim` values."""

from __future__ import annotations

# plan name -> TrainingArguments.optim
TRAINER_OPTIM = {
    "adamw_torch": "adamw_torch_fused",  # fused kernel: no foreach temporaries the size of the model
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "sgd": "sgd",
}


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """The same optimizer class and settings Trainer uses for TRAINER_OPTIM[name]."""
    import torch

    params = [p for p in params if p.requires_grad]
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)

"""The training runtime copied into every generated project (transformers, peft, bitsandbytes, accelerate).

It imports nothing from peftplan.planner or peftplan.schemas.
"""

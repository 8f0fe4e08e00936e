"""peftplan: will it fit, which method, how long — then a runnable training project."""

__version__ = "0.1.0"

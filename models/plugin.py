"""vLLM general plugin: registers VITA in every vLLM process (entry point `vllm.general_plugins`)."""

from .config import VITA_ARCHITECTURE, register_config


def register() -> None:
    from vllm import ModelRegistry

    register_config()
    if VITA_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The lazy "module:Class" form keeps vLLM from importing torch models (and CUDA) in the parent.
        ModelRegistry.register_model(VITA_ARCHITECTURE, "models.vllm_model:VitaForConditionalGeneration")

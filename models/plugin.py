"""vLLM general plugin: registers VITA in every vLLM process (entry point `vllm.general_plugins`)."""

from .config import VITA_ARCHITECTURE, register_config
from .vita_tts.config import VITA_TTS_ARCHITECTURE

# vLLM's `config_format` for VITA checkpoints: our parser reads every published format (models.checkpoint).
VITA_CONFIG_FORMAT = "vita"


def register() -> None:
    from vllm import ModelRegistry

    register_config()
    from vllm.transformers_utils import config as vllm_configs

    from .checkpoint import vllm_config_parser

    if VITA_CONFIG_FORMAT not in vllm_configs._CONFIG_FORMAT_TO_CONFIG_PARSER:  # once per process
        vllm_configs.register_config_parser(VITA_CONFIG_FORMAT)(vllm_config_parser())
    if VITA_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The lazy "module:Class" form keeps vLLM from importing torch models (and CUDA) in the parent.
        ModelRegistry.register_model(VITA_ARCHITECTURE, "models.vllm_model:VitaForConditionalGeneration")
    if VITA_TTS_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The second architecture: VITA-1.5's speech decoder (AR stage), served by its own engine (models.vita_tts).
        ModelRegistry.register_model(VITA_TTS_ARCHITECTURE, "models.vita_tts.vllm_decoder:VitaTTSDecoderForCausalLM")

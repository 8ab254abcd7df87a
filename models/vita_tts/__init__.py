"""VITA-1.5's own voice: the text-embedding -> codec-token speech decoder (NAR + AR) and the TiCodec decoder.

Layout of a published `vita_tts_ckpt/` (beside the VITA-1.5 model):
  decoder/model.json  [idim, odim, args]   decoder/final.pt  (a pickled state dict)
  codec/model.json    TiCodec hyper-parameters             codec/final.pt    {"generator", "quantizer", "encoder"}

Modules: `config` (the two JSON files), `weights` (safe loading + declarative names), `reference` (pure-torch
math of upstream), `streaming` (codec chunk windows and cut points), `vllm_decoder` (the AR decoder as a vLLM
model), `engine` (the decoder engine: NAR in torch, AR in vLLM, codec in torch), `tiny` (tiny checkpoints).
"""

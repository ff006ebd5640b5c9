"""The network and its weights: config, tokenizer, CLIP text encoder, UNet, VAE, attention kernels,
in-place and upcast numerics, checkpoint and weight-file reading, the four-fragment split, file hashes
and default file locations.

The bottom layer: imports only the standard library, torch and the other run-time dependencies. Add-ons
attach from above to the hook points the modules offer (the UNet blocks' `adapter`/`adapter_inout`).
"""

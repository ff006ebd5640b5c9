"""The engine: requests and their validation, the model spec, how customizations are resolved per
model and request, the memory model and offload policy, the planner, VAE tiling, the pipeline and the
`Engine` object every front calls.

May import `model`, `sampling` and `custom`.
"""

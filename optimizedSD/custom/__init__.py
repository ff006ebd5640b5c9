"""What a user adds to a checkpoint: LoRA files, textual-inversion embeddings, adapters (arXiv
2303.18181), a separate VAE; each read, checked and applied to the fragments' host masters.

May import `model` only (not `sampling`, its peer).
"""

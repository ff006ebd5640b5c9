"""Sampling: the CompVis DDIM/PLMS samplers, the k-diffusion samplers, noise schedules, prompt parsing.

May import `model` only.
"""

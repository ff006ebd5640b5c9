"""The fronts, thin over the engine: the command line, the browser UI, the Ray cluster runner. Flags,
widgets or jobs in, one engine call, files out; no rule of their own.

May import `outputs`, `engine` and the layers below.
"""

"""What a render leaves behind: image files and their names, PNG metadata (the webui's infotext),
grids, the output folder's manifest, in-order delivery of a cluster's results.

May import `engine` and the layers below it.
"""

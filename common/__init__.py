"""Code shared by several method scripts: data, backbones, distributed helpers, checkpoints, losses.

Method-specific code (a pretext task, a head, an optimizer used by one method) stays in its script.
"""

"""Your backbones: every module in this folder is imported when the registry loads.

Put a file here that decorates a builder with ``@register("name", spatial_dims=2|3)``
(see ``example_fcn.py``); ``main.py --backbone name``, ``test.py`` and checkpoint
loading then find it with no other change, and the test suite's "every registered
backbone" test covers it.
"""

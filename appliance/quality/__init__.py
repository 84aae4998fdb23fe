"""Quality and privacy evaluation of synthetic beats against real held-out data.

``report.build_report`` evaluates the current model of a store and two baselines on the
MIT-BIH de Chazal protocol and writes one HTML page with PNG figures and the same numbers as
JSON. Only aggregate figures leave this package.
"""

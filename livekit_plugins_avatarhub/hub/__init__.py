"""The model hub: an avatar id becomes a verified ``.imx`` on local disk.

``resolver`` decides (cache, bitHuman's API, download), ``cache`` keeps files, their records
and leases, ``download`` fetches one file resumably and verified.
"""

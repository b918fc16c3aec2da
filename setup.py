"""Optional C speed-ups for the hot path (kernel record decoder, JSON Lines encoder,
bcc table rows).

`optional=True`: without a compiler or Python headers the install still
succeeds and tcpstates uses the pure-Python path (byte-identical output, more
CPU per event); `tcpstates doctor` says which path is in use.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("tcpstates.plugins.jsonl._encode", ["plugins/jsonl/_encode.c"], optional=True),
    Extension("tcpstates.plugins.bcc_table._rows", ["plugins/bcc_table/_rows.c"], optional=True),
    Extension("tcpstates.plugins.kernel._decode", ["plugins/kernel/_decode.c"], optional=True),
])

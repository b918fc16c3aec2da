"""Optional C speed-ups for the hot path (kernel record decoder, JSON Lines encoder,
bcc table rows, the owner and container enrichers' loops).

`optional=True`: without a compiler or Python headers the install still
succeeds and tcpstates uses the pure-Python path (byte-identical output, more
CPU per event); `tcpstates doctor` says which path is in use.
"""

from setuptools import Extension, setup

# core/event_slots.h: Event's slot offsets, shared by the extensions
SLOTS = {"include_dirs": ["core"], "depends": ["core/event_slots.h"], "optional": True}

setup(ext_modules=[
    Extension("tcpstates.plugins.jsonl._encode", ["plugins/jsonl/_encode.c"], **SLOTS),
    Extension("tcpstates.plugins.bcc_table._rows", ["plugins/bcc_table/_rows.c"], **SLOTS),
    Extension("tcpstates.plugins.kernel._decode", ["plugins/kernel/_decode.c"], **SLOTS),
    Extension("tcpstates.plugins.owner._observe", ["plugins/owner/_observe.c"], **SLOTS),
    Extension("tcpstates.plugins.container._enrich", ["plugins/container/_enrich.c"], **SLOTS),
])

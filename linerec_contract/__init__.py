"""The contract between a recording box and the central archive, imported by both sides.

Everything both ends must agree on lives here and nowhere else, so a change to the recorder
cannot silently break central and central never imports the box's internals (nor the capture
libraries they need). Modules, by job:

``errors``      the exception hierarchy (one-line messages, exit codes)
``durable``     durable-file helpers (the fsync discipline)
``canonical``   the canonical JSON that is signed
``identity``    device signing keys and age identities
``codec``       the audio codecs a payload may use
``manifest``    the manifest schema
``segment``     sealing and the wire container
``verify``      signature, payload-hash and chain checks
``trust``       which key may sign segment N of device D
``protocol``    MQTT topics, messages and their parsing (docs/protocol.md)
``tls``         TLS contexts for both ends of a link

The formats are specified in ``docs/segment-format.md`` and ``docs/protocol.md``.
"""

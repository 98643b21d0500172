"""Reading a run's TensorBoard event files in tests (TFRecord framing, Event protos; no TensorFlow)."""

import os
import struct

from tensorboardX.proto import event_pb2


def summary_kinds(workdir) -> dict[str, str]:
    """{tag: what the summary holds ('simple_value', 'image', 'tensor', ...)} over W/tb/'s event files."""
    kinds = {}
    tb = os.path.join(workdir, "tb")
    for name in os.listdir(tb):
        if not name.startswith("events.out.tfevents"):  # e.g. plugins/: the profiler's trace
            continue
        with open(os.path.join(tb, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            for v in event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]).summary.value:
                kinds[v.tag] = v.WhichOneof("value")
            pos += 12 + length + 4
    return kinds

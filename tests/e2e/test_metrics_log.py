"""Training metrics land in metrics.jsonl and in TensorBoard event files that read back."""

import glob
import json
import struct

from lmtrain.train.metrics_log import MetricsLogger


def read_tensorboard_scalars(directory: str) -> list[tuple[int, str, float]]:
    """Parse TFRecord-framed Event protos (length, crc, data, crc) without TensorFlow."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in glob.glob(f"{directory}/events.out.tfevents.*"):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value))
    return sorted(out)


def test_metrics_written_to_jsonl_and_tensorboard(tmp_path):
    log = MetricsLogger(str(tmp_path))
    log.write(10, {"train/loss": 2.5, "train/lr": 1e-3, "note": "warmup"})
    log.write(20, {"train/loss": 2.0, "train/lr": float("nan")})
    log.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines == [
        {"step": 10, "train/loss": 2.5, "train/lr": 1e-3, "note": "warmup"},
        {"step": 20, "train/loss": 2.0, "train/lr": None},  # non-finite → null, valid JSON
    ]
    scalars = read_tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert [(s, t) for s, t, _ in scalars] == [
        (10, "train/loss"),
        (10, "train/lr"),
        (20, "train/loss"),
    ]
    assert abs(scalars[0][2] - 2.5) < 1e-6 and abs(scalars[1][2] - 1e-3) < 1e-9


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "run"), enabled=False)
    log.write(1, {"train/loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()

import subprocess
import sys
from multiprocessing import resource_tracker

import pytest
import torch

from pdserve.cluster.step_channel import WRITER_PID, StepChannel
from pdserve.errors import WorkerFailedError


@pytest.fixture
def channel_pair():
    writer = StepChannel.create(capacity=16, num_readers=1)
    reader = StepChannel(writer.name, 16, 1, create=False)
    yield writer, reader
    reader.close()
    # One process plays both sides here: give the writer back the tracking the reader dropped.
    resource_tracker.register(writer.shm._name, "shared_memory")
    writer.close()


def test_messages_arrive_in_order_and_writer_waits_for_the_ack(channel_pair):
    writer, reader = channel_pair
    writer.publish(1, torch.arange(5), timeout_s=1)
    with pytest.raises(WorkerFailedError, match="did not take step 1 within 0s"):
        writer.publish(1, torch.arange(3), timeout_s=0.05)  # the reader has not taken step 1 yet
    command, payload = reader.receive(0)
    assert command == 1 and payload.tolist() == [0, 1, 2, 3, 4]
    writer.publish(0, None, timeout_s=1)
    assert reader.receive(0)[0] == 0


def test_reader_fails_when_the_writer_process_is_gone(channel_pair):
    writer, reader = channel_pair
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    writer.words[WRITER_PID] = int(dead.stdout)
    with pytest.raises(WorkerFailedError, match="rank 0's process is gone"):
        reader.receive(0)


def test_oversized_step_is_refused(channel_pair):
    writer, _ = channel_pair
    with pytest.raises(AssertionError, match="exceeds the channel's 16"):
        writer.publish(1, torch.arange(17), timeout_s=1)

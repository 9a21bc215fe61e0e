"""The worker-thread job the Slicer effect polls, running the real volume runner."""

import threading

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.errors import Cancelled
from SaLIPSegmentLib.jobs import BackgroundJob
from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
from SaLIPSegmentLib.settings import VolumeSettings
from SaLIPSegmentLib.volume import segment_volume

from conftest import TINY_SAM_PROPOSALS, disk_image


@pytest.fixture(scope="module")
def run_volume(tiny_sam, tiny_sam_checkpoint):
    segmenter = create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)
    volume = np.stack([disk_image(radius=6 + i) for i in range(6)])

    def run(progress, should_cancel, gate=None):
        def gated_progress(done, total):
            progress(done, total)
            if gate is not None and done == 2:
                gate.wait(10)  # hold the worker so the test can cancel at a known slice
        return segment_volume(volume, segmenter, OracleScorer(), ["x"],
                              VolumeSettings(proposal=ProposalSettings.from_dict(TINY_SAM_PROPOSALS)),
                              reference=volume > 100, progress=gated_progress, should_cancel=should_cancel)

    return run


def test_a_job_runs_on_another_thread_and_hands_back_the_result(run_volume):
    threads = []
    job = BackgroundJob(lambda p, c: threads.append(threading.current_thread()) or run_volume(p, c)).start()
    assert job.wait(60)
    assert job.error is None and job.result.mask.shape == (6, 64, 64)
    assert job.progress == (6, 6)
    assert threads[0] is not threading.current_thread()


def test_cancel_stops_between_slices_and_returns_nothing(run_volume):
    gate = threading.Event()
    job = BackgroundJob(lambda p, c: run_volume(p, c, gate)).start()
    while job.progress[0] < 2:
        job.wait(0.01)
    job.cancel()
    gate.set()
    assert job.wait(60)
    assert job.cancelled and isinstance(job.error, Cancelled) and job.result is None
    assert job.progress == (2, 6)


def test_errors_reach_the_polling_thread():
    job = BackgroundJob(lambda p, c: 1 / 0).start()
    assert job.wait(5) and isinstance(job.error, ZeroDivisionError)
    with pytest.raises(RuntimeError):
        job.start()

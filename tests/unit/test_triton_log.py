"""How the target service logs Triton's output (`target_service.launcher.line_level`): the model's warnings
and errors, with their tracebacks, at their own level; Triton's and the model's chatter at DEBUG."""

from __future__ import annotations

import logging

from target_service.launcher import line_level

MODEL_ERROR = "2026-12-03 09:21:23,512 ERROR target_service.triton_model: a batch of 3 request(s) failed"
TRACEBACK = ["Traceback (most recent call last):", '  File "steps.py", line 1, in run_batch', "KeyError: 7"]


def test_the_models_errors_and_their_tracebacks_are_errors_here():
    levels, previous = [], logging.DEBUG
    for line in [MODEL_ERROR, *TRACEBACK]:
        previous = line_level(line, previous)
        levels.append(previous)
    assert levels == [logging.ERROR] * 4


def test_the_models_warnings_keep_their_level_and_its_info_stays_debug():
    assert line_level("2026-12-03 09:21:23,512 WARNING specdec.x: slow") == logging.WARNING
    assert line_level("2026-12-03 09:21:23,512 CRITICAL specdec.x: down") == logging.CRITICAL
    assert line_level("2026-12-03 09:21:23,512 INFO specdec.models: loaded", logging.ERROR) == logging.DEBUG


def test_a_stubs_stacks_on_sigusr1_are_errors_here_line_by_line():
    lines = ["Thread 0x00007f60e325f000 (most recent call first):",
             '  File "target_service/scheduler.py", line 116 in _next_batch', "",
             "Current thread 0x00007f6117725000 (most recent call first):", "  <no Python frame>"]
    levels, previous = [], logging.DEBUG
    for line in lines:
        previous = line_level(line, previous)
        levels.append(previous)
    assert levels == [logging.ERROR, logging.ERROR, logging.DEBUG, logging.ERROR, logging.ERROR]


def test_tritons_own_lines_by_their_letter_and_what_follows_them_alike():
    assert line_level('E1203 09:21:16.606994 17467 model.cc:1] "failed"') == logging.ERROR
    assert line_level('F1203 09:21:16.606994 17467 server.cc:1] "fatal"') == logging.ERROR
    assert line_level('W1203 09:21:16.606994 17467 pinned_memory_manager.cc:170] "no pool"') == logging.WARNING
    info = line_level('I1203 09:21:16.607645 17467 server.cc:631]', logging.ERROR)
    assert info == logging.DEBUG and line_level("| Backend | Path |", info) == logging.DEBUG
    assert line_level("Signal (15) received.", logging.ERROR) == logging.DEBUG  # not part of what came before
    harmless = 'W1203 09:21:16.6 17467 x.cc:1] "CudaDriverHelper has not been initialized."'
    assert line_level(harmless) == logging.DEBUG

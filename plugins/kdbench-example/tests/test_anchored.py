from __future__ import annotations

import kdbench_anchored
import torch


def test_registered(make_host):
    host = make_host(kdbench_anchored)
    assert host.methods.get("anchored-kd").teacher_update == "anchored"
    assert host.teacher_updates.get("anchored").needs_quiz


def test_teacher_moves_and_stays_anchored(make_host, run_tiny):
    host = make_host(kdbench_anchored)
    result = run_tiny(host, "anchored-kd", steps=12)
    assert result["status"] == "ok", result.get("reason")
    last = result["extra"]["last_metrics"]
    assert last["teacher/drift"] > 0  # the teacher moved away from its start
    assert torch.isfinite(torch.tensor(last["teacher/quiz_ce"]))
